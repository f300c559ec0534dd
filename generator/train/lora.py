"""Oracle LoRAs with PEFT: one adapter per task (the library T2L learns from), and a multi-task baseline.

Each adapter is trained on its task's examples with no instruction in the prompt, so the adapter alone
selects the task. Every adapter starts from the same PEFT initialisation (same seed): their A matrices
share a starting point, which makes the library a smoother regression target for reconstruction.
Weights are rounded to bfloat16 when saved (what ships in the demo bundle); evaluation reads those.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from generator.errors import InputError
from generator.train.basemodel import TARGET_MODULES, Codec, collate, completion_loss, load_base
from generator.train.loop import LoopConfig, train_loop
from generator.train.suite import Suite

MULTITASK = "_multitask"  # library entry of the adapter trained on every seen task at once
R, ALPHA = 8, 16


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=True, target_modules=list(TARGET_MODULES), lora_dropout=0.0,
                      task_type="CAUSAL_LM")


class LoraTrainer:
    """One base model wrapped by PEFT once; each `train` call restarts the LoRA from the same initial
    weights (and a fresh optimiser), so adapters trained one after another are independent."""

    def __init__(self, base_dir: str | Path, init_seed: int = 0):
        from peft import get_peft_model

        model, self.codec = load_base(base_dir)
        torch.manual_seed(init_seed)
        self.model = get_peft_model(model, lora_config())
        self.init = {k: v.detach().clone() for k, v in self.model.named_parameters() if v.requires_grad}

    def train(self, suite: Suite, tasks: Sequence[str], out_dir: str | Path, cfg: LoopConfig, *,
              batch_size: int = 32, pack: int = 2) -> dict:
        """Train a LoRA on the examples of `tasks` (one task: an oracle; many: a multi-task LoRA)."""
        unknown = [t for t in tasks if t not in suite.train_examples]
        if unknown:
            raise InputError(f"unknown tasks {unknown}; the suite has {', '.join(suite.tasks)}")
        with torch.no_grad():
            for k, p in self.model.named_parameters():
                if k in self.init:
                    p.copy_(self.init[k])
        draw = _sampler(suite, self.codec, list(tasks), batch_size, pack)
        log = train_loop(self.model, lambda step, rng: completion_loss(self.model, *collate(draw(rng))), cfg, out_dir,
                         name=f"lora {tasks[0] if len(tasks) == 1 else f'{len(tasks)} tasks'}", extra_log={"tasks": list(tasks)})
        self.model.save_pretrained(str(out_dir))
        _to_bfloat16(Path(out_dir))
        (Path(out_dir) / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
        return log


def _to_bfloat16(out_dir: Path) -> None:
    """Round the saved adapter to bfloat16 (half the bytes; what the bundle ships and evaluation reads)."""
    from safetensors.torch import load_file, save_file

    path = out_dir / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})


def train_lora(base_dir: str | Path, suite: Suite, tasks: Sequence[str], out_dir: str | Path, cfg: LoopConfig, *,
               batch_size: int = 32, pack: int = 2, init_seed: int = 0) -> dict:
    """Train one PEFT LoRA on the examples of `tasks` (one task: an oracle; many: a multi-task LoRA)."""
    return LoraTrainer(base_dir, init_seed).train(suite, tasks, out_dir, cfg, batch_size=batch_size, pack=pack)


def _sampler(suite: Suite, codec: Codec, tasks: list[str], batch_size: int, pack: int):
    def draw(rng):
        out = []
        for _ in range(batch_size):
            t = rng.choice(tasks)
            out.append(codec.sequence([rng.choice(suite.train_examples[t]) for _ in range(pack)]))
        return out

    return draw


def train_library(base_dir: str | Path, suite: Suite, out_dir: str | Path, cfg: LoopConfig, multitask_cfg: LoopConfig,
                  tasks: Sequence[str] | None = None, **kwargs) -> dict[str, dict]:
    """An oracle LoRA for every task (held-out ones too: they are evaluation's upper bound, never shown to
    the hypernetwork) in out_dir/<task>/, and a multi-task LoRA over the seen tasks in out_dir/_multitask/.
    A task whose adapter is already there is skipped, so an interrupted build resumes."""
    out = Path(out_dir)
    todo = [(t, [t], cfg) for t in (tasks or suite.tasks)]
    if tasks is None:
        todo.append((MULTITASK, suite.seen, multitask_cfg))
    todo = [job for job in todo if not (out / job[0] / "adapter_model.safetensors").exists()]
    trainer = LoraTrainer(base_dir, kwargs.pop("init_seed", 0)) if todo else None
    logs = {}
    for name, job_tasks, job_cfg in todo:
        logs[name] = trainer.train(suite, job_tasks, out / name, job_cfg, **kwargs)
    return logs
