"""One training loop for every trainer: seeded, resumable, with a progress bar, a JSON log and a loss curve.

A trainer gives the loop its trainable module and a `loss_at(step)` function. Batches are drawn from
`random.Random(seed, step)`, so a resumed run draws exactly the batches an uninterrupted one would have.
Every `ckpt_every` steps the loop writes `train_state.pt` (weights, optimiser, step, log) into the output
directory, read back with `torch.load(weights_only=True)`; at the end it writes `train_log.json` and
`loss.png` next to whatever the trainer saves.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from generator.errors import InputError

STATE = "train_state.pt"
LOG = "train_log.json"
CURVE = "loss.png"


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200  # 0: never (the final weights are still saved by the trainer)
    progress: bool = True  # a tqdm bar on stderr

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.warmup < 0 or self.log_every < 1 or self.ckpt_every < 0:
            raise InputError(f"bad training settings: {self}")


def step_rng(seed: int, step: int) -> random.Random:
    """The batch sampler of one step: a function of (seed, step) only, so resuming is exact."""
    return random.Random(seed * 1_000_003 + step)


def lr_at(cfg: LoopConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_loop(
    module: nn.Module,
    loss_at: Callable[[int, random.Random], torch.Tensor],
    cfg: LoopConfig,
    out_dir: str | Path,
    *,
    name: str = "train",
    resume: bool = True,
    extra_log: dict | None = None,
) -> dict:
    """Optimise the trainable parameters of `module`; returns the log (also written to out_dir)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise InputError(f"{name}: nothing to train (no parameter requires grad)")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    log: dict = {"name": name, "config": asdict(cfg), "step": [], "loss": [], "elapsed_s": 0.0, **(extra_log or {})}
    start = 0
    state_path = out / STATE
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)  # never unpickle code
        # the state holds the trainable weights only (frozen ones come from the module's own source), so
        # exactly those keys must match: anything else is a state from another run or another model
        trainable = {k for k, p in module.named_parameters() if p.requires_grad}
        if set(state["model"]) != trainable:
            raise InputError(f"{state_path} is the resume state of a different model or trainer; delete it or "
                             "pass --no-resume to start over")
        module.load_state_dict(state["model"], strict=False)  # strict on the trainable keys, checked above
        opt.load_state_dict(state["optim"])
        start = int(state["step"])
        log["step"], log["loss"] = state["log_step"].tolist(), state["log_loss"].tolist()
        log["elapsed_s"] = float(state["elapsed_s"])
        log["resumed_from"] = start
    torch.manual_seed(cfg.seed)
    module.train()
    bar = _bar(cfg, start, name)
    t0, running, n_running = time.perf_counter() - log["elapsed_s"], 0.0, 0
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        loss = loss_at(step, step_rng(cfg.seed, step))
        if not torch.isfinite(loss):
            raise InputError(f"{name}: the loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        running += loss.item()
        n_running += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log["step"].append(step + 1)
            log["loss"].append(running / n_running)
            if bar is not None:
                bar.set_postfix(loss=f"{running / n_running:.4f}")
            running, n_running = 0.0, 0
        if bar is not None:
            bar.update(1)
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            log["elapsed_s"] = time.perf_counter() - t0
            _save_state(state_path, module, opt, step + 1, log)
    if bar is not None:
        bar.close()
    module.eval()
    log["elapsed_s"] = time.perf_counter() - t0
    write_log(log, out)
    state_path.unlink(missing_ok=True)  # finished: the trainer's own artifact replaces the resume state
    return log


def _bar(cfg: LoopConfig, start: int, name: str):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=name, unit="step", dynamic_ncols=True, leave=False)


def _save_state(path: Path, module: nn.Module, opt: torch.optim.Optimizer, step: int, log: dict) -> None:
    trainable = {k for k, p in module.named_parameters() if p.requires_grad}
    state = {
        "model": {k: v.detach().clone() for k, v in module.state_dict().items() if k in trainable},
        "optim": opt.state_dict(),
        "step": step,
        "log_step": torch.tensor(log["step"], dtype=torch.int64),
        "log_loss": torch.tensor(log["loss"], dtype=torch.float64),
        "elapsed_s": log["elapsed_s"],
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous state intact


def write_log(log: dict, out_dir: Path) -> None:
    """train_log.json and loss.png (log-scale loss against step)."""
    (out_dir / LOG).write_text(json.dumps(log, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(log["step"], log["loss"], lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(log["name"])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / CURVE, metadata={"Software": None})
    plt.close(fig)
