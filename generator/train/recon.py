"""Reconstruction training (T2L): the hypernetwork learns to reproduce a library of oracle LoRAs from
their tasks' descriptions. Loss: mean squared error on A and on B, each divided by the library's variance
of that tensor kind, so A (of order 1/sqrt(d_in)) and B (small) weigh alike."""

from __future__ import annotations

from pathlib import Path

import torch

from generator.checkpoint import Checkpoint
from generator.config import HyperConfig
from generator.hypernet import build_hypernet
from generator.train.conditioning import EmbeddingTable
from generator.train.functional import read_peft
from generator.train.loop import LoopConfig, train_loop
from generator.train.suite import Suite


def train_recon(config: HyperConfig, suite: Suite, library: str | Path, out_dir: str | Path, cfg: LoopConfig, *,
                batch_size: int = 32, table: EmbeddingTable | None = None) -> dict:
    tasks = suite.seen
    targets = {t: read_peft(Path(library) / t, config.target_modules, config.n_layers) for t in tasks}
    var = {(m, k): torch.cat([targets[t][m][k].flatten() for t in tasks]).var().clamp_min(1e-12)
           for m in config.target_modules for k in (0, 1)}
    table = table or EmbeddingTable.for_suite(config.encoder, suite)
    torch.manual_seed(cfg.seed)
    net = build_hypernet(config)

    def loss_at(step, rng):
        picks = [rng.choice(tasks) for _ in range(batch_size)]
        emb = table([rng.choice(suite.train_descriptions[t]) for t in picks])
        pred = net(emb)
        loss = 0.0
        for m, (a, b) in pred.items():
            ta = torch.cat([targets[t][m][0] for t in picks])
            tb = torch.cat([targets[t][m][1] for t in picks])
            loss = loss + ((a - ta) ** 2).mean() / var[(m, 0)] + ((b - tb) ** 2).mean() / var[(m, 1)]
        return loss / (2 * len(pred))

    log = train_loop(net, loss_at, cfg, out_dir, name="T2L reconstruction", extra_log={"tasks": tasks})
    Checkpoint.from_module(net, source=str(out_dir)).save(out_dir)
    return log
