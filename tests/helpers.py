"""Builders shared by tests."""

import torch

from generator.checkpoint import Checkpoint
from generator.config import EncoderSpec, HyperConfig, ModuleSpec
from generator.hypernet import build_hypernet


def tiny_checkpoint(variant: str = "L", seed: int = 0, modules=None, n_layers: int = 2, e: int = 16) -> Checkpoint:
    """A small random hypernetwork: q 32→32, v 32→16 unless `modules` says otherwise."""
    torch.manual_seed(seed)
    config = HyperConfig(
        variant=variant, task_emb_dim=e, latent=16, head_in=32, n_layers=n_layers,
        modules=modules or (ModuleSpec("q_proj", 32, 32), ModuleSpec("v_proj", 32, 16)),
        r=2, encoder=EncoderSpec(dim=e), base_model="tiny-random/llama",
    )
    return Checkpoint.from_module(build_hypernet(config), source="tiny")
