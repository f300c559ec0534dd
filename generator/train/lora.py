"""Oracle LoRAs with PEFT: one adapter per task (the library T2L learns from), and a multi-task baseline.

Each adapter is trained on its task's examples with no instruction in the prompt, so the adapter alone
selects the task. Every adapter starts from the same PEFT initialisation (same seed): their A matrices
share a starting point, which makes the library a smoother regression target for reconstruction.
Weights are rounded to bfloat16 when saved (what ships in the demo bundle); evaluation reads those.
`LoraSettings` (target modules, rank, alpha) are those of every adapter and of the hypernetworks that
generate them (`loragen train lora|recon|sft --target-modules --rank --alpha`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from generator.config import MODULE_PARENTS
from generator.errors import InputError
from generator.train.basemodel import TARGET_MODULES, load_base
from generator.train.functional import target_linears
from generator.train.loop import LoopConfig, train_loop
from generator.train.prompting import PromptFormat, completion_loss
from generator.train.suite import Suite

MULTITASK = "_multitask"  # library entry of the adapter trained on every seen task at once
R, ALPHA = 8, 16


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA every adapter is: which projections of each decoder layer, rank r, lora_alpha. Scaling is
    alpha/sqrt(r) (rsLoRA), as T2L's."""

    target_modules: tuple[str, ...] = TARGET_MODULES  # T2L adapts the attention query and value projections
    r: int = R  # T2L's rank
    alpha: float = ALPHA  # T2L keeps alpha 16 for every rank

    def __post_init__(self) -> None:
        if not self.target_modules:
            raise InputError("target modules must name at least one projection, e.g. q_proj,v_proj")
        unknown = [m for m in self.target_modules if m not in MODULE_PARENTS]
        if unknown:
            raise InputError(f"unknown target modules {unknown}; a Llama-family decoder layer has "
                             f"{', '.join(MODULE_PARENTS)}")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise InputError(f"target modules must be distinct, got {', '.join(self.target_modules)}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise InputError(f"the LoRA rank must be a positive integer, got {self.r!r}")
        if not self.alpha > 0 or not math.isfinite(self.alpha):
            raise InputError(f"the LoRA alpha must be a positive number, got {self.alpha!r}")

    @staticmethod
    def parse_modules(text: str) -> tuple[str, ...]:
        """Target modules from a comma-separated list (--target-modules q_proj,v_proj)."""
        return tuple(m.strip() for m in text.split(",") if m.strip())


DEFAULT_LORA = LoraSettings()  # T2L's: q_proj and v_proj, rank 8, alpha 16


def lora_config(lora: LoraSettings = DEFAULT_LORA):
    from peft import LoraConfig

    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return LoraConfig(r=lora.r, lora_alpha=alpha, use_rslora=True, target_modules=list(lora.target_modules),
                      lora_dropout=0.0, task_type="CAUSAL_LM")


class LoraTrainer:
    """One base model wrapped by PEFT once; each `train` call restarts the LoRA from the same initial
    weights (and a fresh optimiser), so adapters trained one after another are independent."""

    def __init__(self, base_dir: str | Path, init_seed: int = 0, *, lora: LoraSettings = DEFAULT_LORA,
                 template: str = "auto"):
        from peft import get_peft_model

        model, self.prompt_format = load_base(base_dir, template)
        target_linears(model, lora.target_modules)  # InputError naming the module a layer lacks, before PEFT's own
        torch.manual_seed(init_seed)
        self.model = get_peft_model(model, lora_config(lora))
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
        fmt = self.prompt_format
        draw = _sampler(suite, fmt, list(tasks), batch_size, pack)
        log = train_loop(self.model, lambda step, rng: completion_loss(self.model, *fmt.batch(draw(rng))), cfg, out_dir,
                         name=f"lora {tasks[0] if len(tasks) == 1 else f'{len(tasks)} tasks'}",
                         extra_log={"tasks": list(tasks), "prompt_format": fmt.name})
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
               batch_size: int = 32, pack: int = 2, init_seed: int = 0, lora: LoraSettings = DEFAULT_LORA,
               template: str = "auto") -> dict:
    """Train one PEFT LoRA on the examples of `tasks` (one task: an oracle; many: a multi-task LoRA)."""
    trainer = LoraTrainer(base_dir, init_seed, lora=lora, template=template)
    return trainer.train(suite, tasks, out_dir, cfg, batch_size=batch_size, pack=pack)


def _sampler(suite: Suite, fmt: PromptFormat, tasks: list[str], batch_size: int, pack: int):
    def draw(rng):
        out = []
        for _ in range(batch_size):
            t = rng.choice(tasks)
            out.append(fmt.sequence([rng.choice(suite.train_examples[t]) for _ in range(pack)]))
        return out

    return draw


def train_library(base_dir: str | Path, suite: Suite, out_dir: str | Path, cfg: LoopConfig, multitask_cfg: LoopConfig,
                  tasks: Sequence[str] | None = None, *, batch_size: int = 32, pack: int = 2, init_seed: int = 0,
                  lora: LoraSettings = DEFAULT_LORA, template: str = "auto") -> dict[str, dict]:
    """An oracle LoRA for every task of `tasks` (default: all, held-out ones too: they are evaluation's
    upper bound, never shown to the hypernetwork) in out_dir/<task>/, and a multi-task LoRA over all the
    seen tasks in out_dir/_multitask/. A task whose adapter is already there is skipped, so an interrupted
    build resumes."""
    out = Path(out_dir)
    todo = [(t, [t], cfg) for t in (suite.tasks if tasks is None else tasks)]
    todo.append((MULTITASK, suite.seen, multitask_cfg))
    todo = [job for job in todo if not (out / job[0] / "adapter_model.safetensors").exists()]
    trainer = LoraTrainer(base_dir, init_seed, lora=lora, template=template) if todo else None
    logs = {}
    for name, job_tasks, job_cfg in todo:
        logs[name] = trainer.train(suite, job_tasks, out / name, job_cfg, batch_size=batch_size, pack=pack)
    return logs
