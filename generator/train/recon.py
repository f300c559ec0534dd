"""Reconstruction training (T2L): the hypernetwork learns to reproduce a library of oracle LoRAs from
their tasks' descriptions. Loss: mean squared error on A and on B, each divided by the library's variance
of that tensor kind, so A (of order 1/sqrt(d_in)) and B (small) weigh alike."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from generator.checkpoint import Checkpoint
from generator.config import HyperConfig
from generator.errors import InputError
from generator.hypernet import build_hypernet
from generator.train.conditioning import Table, check_table, training_table
from generator.train.functional import peft_settings, read_peft
from generator.train.loop import LoopConfig, train_loop
from generator.train.sft import check_dropout
from generator.train.suite import Suite


def train_recon(config: HyperConfig, suite: Suite, library: str | Path, out_dir: str | Path, cfg: LoopConfig, *,
                batch_size: int = 32, table: Table | None = None, tasks: Sequence[str] | None = None,
                dropout: float = 0.0) -> dict:
    """Train on the library adapters of `tasks` (default: every seen task), conditioned on their training
    descriptions. Default table: the training table, of token states when `config` has a token reader (config.reader),
    else of pooled embeddings. `dropout`: inside the hypernetwork while it trains (see `check_dropout`)."""
    check_dropout(dropout)
    if tasks is None:
        tasks = suite.seen
    unseen = sorted(set(tasks) - set(suite.seen))
    if unseen:
        raise InputError(f"reconstruction trains on seen tasks only; {unseen[:5]} are held out or unknown")
    tasks = list(tasks)
    for t in tasks:
        check_library_adapter(Path(library) / t, config)
    targets = {t: read_peft(Path(library) / t, config.target_modules, config.n_layers) for t in tasks}
    var = {(m, k): torch.cat([targets[t][m][k].flatten() for t in tasks]).var().clamp_min(1e-12)
           for m in config.target_modules for k in (0, 1)}
    table = table or training_table(config, suite)
    check_table(config, table)
    torch.manual_seed(cfg.seed)
    net = build_hypernet(config, dropout)

    def loss_at(step, rng):
        picks = [rng.choice(tasks) for _ in range(batch_size)]
        pred = table.adapters(net, [rng.choice(suite.train_descriptions[t]) for t in picks])
        loss = 0.0
        for m, (a, b) in pred.items():
            ta = torch.cat([targets[t][m][0] for t in picks])
            tb = torch.cat([targets[t][m][1] for t in picks])
            loss = loss + ((a - ta) ** 2).mean() / var[(m, 0)] + ((b - tb) ** 2).mean() / var[(m, 1)]
        return loss / (2 * len(pred))

    log = train_loop(net, loss_at, cfg, out_dir, name="T2L reconstruction",
                     extra_log={"tasks": tasks, "base_model": config.base_model, "dropout": dropout,
                                "table": {"texts": len(table.index), "sha256": table.digest}})
    Checkpoint.from_module(net, source=str(out_dir)).save(out_dir)
    return log


def check_library_adapter(path: Path, config: HyperConfig) -> None:
    """The library adapter of one task is a LoRA of the config's modules, rank and alpha (rsLoRA)."""
    if not (path / "adapter_config.json").is_file():
        raise InputError(f"the library has no adapter for task {path.name} ({path}); train it with "
                         "`loragen train lora --all --out LIBRARY` on the same task file")
    got = peft_settings(path)
    missing = [m for m in config.target_modules if m not in got["target_modules"]]
    if missing or got["r"] != config.r or float(got["lora_alpha"]) != config.lora_alpha or not got["use_rslora"]:
        raise InputError(f"{path} is a LoRA of {','.join(got['target_modules'])} with rank {got['r']}, alpha {got['lora_alpha']}"
                         f"{'' if got['use_rslora'] else ' (no rsLoRA)'}, but reconstruction was asked for "
                         f"{','.join(config.target_modules)} with rank {config.r}, alpha {config.lora_alpha:g}; pass the "
                         "--target-modules, --rank and --alpha the library was trained with")
