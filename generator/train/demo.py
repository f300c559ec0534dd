"""Build the demo bundle end to end from one seed: `loragen train demo --out DIR [--basic]`.

    DIR/suite.json          the task suite (tasks, description split, examples, documents): the task universe
                            (see universe.py), or with --basic the basic suite of 34 tasks (see suite.py)
    DIR/base/               the tiny Llama base model (Hugging Face format), pretrained on instructions
    DIR/library/<task>/     oracle PEFT LoRA per task (of the universe: the tasks evaluation scores and a
                            fixed sample of seen tasks for reconstruction); library/_multitask/ the
                            multi-task baseline over every seen task
    DIR/t2l-recon/          T2L trained by reconstruction of the library (native checkpoint)
    DIR/t2l-sft/            T2L trained end to end through the base model (native checkpoint; served)
    DIR/eval/               quality.md, quality.json, adapters.png (`loragen eval DIR`)
    DIR/build.json          the settings this bundle was built with, and each stage's time
Each stage writes train_log.json and loss.png next to its weights. A stage whose output exists is
skipped, and every training loop resumes from its last periodic checkpoint, so an interrupted build
continues where it stopped.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from generator.config import ReaderSpec
from generator.train.loop import LoopConfig
from generator.train.suite import Suite, build_suite
from generator.train.universe import UniverseConfig, build_universe_suite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Every size and step count of a build. `scaled_down()` is the test-sized version."""

    seed: int = 0
    n_train_examples: int = 400
    n_eval_examples: int = 50
    base: LoopConfig = LoopConfig(steps=2000, lr=3e-3, warmup=100, ckpt_every=200, log_every=25)
    base_size: dict = field(default_factory=lambda: {"hidden": 128, "layers": 4, "heads": 4, "intermediate": 384,
                                                     "batch_size": 32, "pack": 4})
    lora: LoopConfig = LoopConfig(steps=80, lr=5e-3, warmup=10, ckpt_every=0, log_every=10)
    multitask: LoopConfig = LoopConfig(steps=160, lr=5e-3, warmup=10, ckpt_every=0, log_every=10)
    recon: LoopConfig = LoopConfig(steps=1500, lr=1e-3, warmup=50, ckpt_every=500, log_every=25)
    sft: LoopConfig = LoopConfig(steps=1200, lr=1e-3, warmup=50, ckpt_every=200, log_every=25)
    # samples per SFT step, and examples per sample (a sample's prompt after the first example shows a pair
    # of the task, which a served prompt never does)
    sft_batch: dict = field(default_factory=lambda: {"batch_size": 32, "pack": 2})
    hyper: dict = field(default_factory=lambda: {"latent": 64, "head_in": 128})
    reader: ReaderSpec | None = None  # the hypernetworks read token states through this reader; None: pooled
    universe: UniverseConfig | None = None  # None: the basic suite; else the task universe of this config
    n_recon_library: int = 32  # universe only: seen tasks with an oracle for reconstruction to learn from

    @classmethod
    def scaled_down(cls, seed: int = 0) -> DemoConfig:
        quick = dict(ckpt_every=0, log_every=5, progress=False, seed=seed)
        return cls(seed=seed, n_train_examples=60, n_eval_examples=12,
                   base=LoopConfig(steps=60, lr=3e-3, warmup=10, **quick),
                   base_size={"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "batch_size": 16, "pack": 2},
                   lora=LoopConfig(steps=15, lr=1e-2, warmup=2, **quick),
                   multitask=LoopConfig(steps=15, lr=1e-2, warmup=2, **quick),
                   recon=LoopConfig(steps=40, lr=2e-3, warmup=5, **quick),
                   sft=LoopConfig(steps=40, lr=2e-3, warmup=5, **quick),
                   hyper={"latent": 16, "head_in": 32})

    @classmethod
    def universe_build(cls, seed: int = 0) -> DemoConfig:
        """The full build on the task universe. The base model reads each task's program and sees one
        example per sequence, so every completion depends on the program (packed examples would let it copy
        the task from earlier pairs); focused draws spend most of its steps on the tasks it gets wrong.
        SFT, too, shows one example per sample, as a served prompt does, in batches of 96.
        The base model's 8,500 steps bring it to 85% with the program on every split; SFT's 1,800 keep the
        whole build within 45 minutes on two cores (docs/training-and-quality.md).
        Evaluated tasks and a small sample of seen ones get an oracle. The
        hypernetworks read pooled embeddings: with the same steps, token-reader SFT learned far less
        (docs/training.md)."""
        from dataclasses import replace

        base = LoopConfig(steps=8500, lr=3e-3, warmup=100, ckpt_every=250, log_every=25)
        sft = LoopConfig(steps=1800, lr=1e-3, warmup=50, ckpt_every=200, log_every=25)
        return replace(cls(), universe=UniverseConfig(), n_train_examples=200, base=base, sft=sft, n_recon_library=16,
                       sft_batch={"batch_size": 96, "pack": 1},
                       lora=LoopConfig(steps=60, lr=5e-3, warmup=10, ckpt_every=0, log_every=10),
                       base_size={"hidden": 160, "layers": 4, "heads": 5, "intermediate": 480,
                                  "batch_size": 64, "pack": 1, "focus": 0.6}).with_seed(seed)

    @classmethod
    def scaled_down_universe(cls, seed: int = 0) -> DemoConfig:
        """The test-sized build of a small universe (nine families, three held-out splits)."""
        from dataclasses import replace

        small = UniverseConfig(seed=seed, families=SMALL_UNIVERSE, n_new_families=1, n_compositions=60,
                               n_train_descriptions=6, n_eval_descriptions=3, n_docs=2, eval_tasks_per_split=2)
        return replace(cls.scaled_down(seed), universe=small, n_eval_examples=6, n_recon_library=6,
                       sft_batch={"batch_size": 16, "pack": 1})

    def with_seed(self, seed: int) -> DemoConfig:
        from dataclasses import replace

        stages = {k: replace(getattr(self, k), seed=seed) for k in ("base", "lora", "multitask", "recon", "sft")}
        universe = replace(self.universe, seed=seed) if self.universe else None
        return replace(self, seed=seed, universe=universe, **stages)

    def build_suite(self) -> Suite:
        from dataclasses import replace

        if self.universe is None:
            return build_suite(self.seed, self.n_train_examples, self.n_eval_examples)
        return build_universe_suite(replace(self.universe, n_train_examples=self.n_train_examples,
                                            n_eval_examples=self.n_eval_examples))

    def library_tasks(self, suite: Suite) -> list[str] | None:
        """The tasks that get an oracle: all of the basic suite's; of a universe, those evaluation scores
        and a fixed sample of seen ones for reconstruction (None: all)."""
        if self.universe is None:
            return None
        evaluated = {t for tasks in suite.evaluated().values() for t in tasks}
        rest = sorted(set(suite.seen) - evaluated)
        recon = sorted(random.Random(self.seed).sample(rest, min(len(rest), self.n_recon_library)))
        return [t for t in suite.tasks if t in evaluated or t in set(recon)]


# the families of the test-sized universe: word, list and number operations, one or two parameters
SMALL_UNIVERSE = ("shift_forward", "take_first", "drop_last", "replace", "wrap", "reverse", "list_nth", "list_sort", "add")


def build_demo(out_dir: str | Path, cfg: DemoConfig = DemoConfig(), *, evaluate: bool = True, progress: bool = True,
               command: str | None = None) -> dict:
    from generator.eval.quality import Bundle, run_eval
    from generator.train.basemodel import pretrain_base
    from generator.train.conditioning import demo_hyper_config, training_table
    from generator.train.lora import train_library
    from generator.train.recon import train_recon
    from generator.train.sft import train_sft

    b = Bundle(Path(out_dir))
    b.root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    times: dict[str, float] = {}

    def stage(name: str, done: bool, fn) -> None:
        if done:
            return
        log.info("demo build: stage %s", name)
        t0 = time.perf_counter()
        fn()
        times[name] = round(time.perf_counter() - t0, 1)

    def loop(c: LoopConfig) -> LoopConfig:
        from dataclasses import replace

        return c if progress else replace(c, progress=False)

    stage("suite", b.suite.exists(), lambda: cfg.build_suite().save(b.suite))
    suite = Suite.load(b.suite)
    stage("base", (b.base / "model.safetensors").exists(),
          lambda: pretrain_base(suite, b.base, loop(cfg.base), **cfg.base_size))
    library_tasks = cfg.library_tasks(suite)
    stage("library", (b.library / "_multitask" / "adapter_model.safetensors").exists(),
          lambda: train_library(b.base, suite, b.library, loop(cfg.lora), loop(cfg.multitask), tasks=library_tasks))
    config = demo_hyper_config(b.base, **cfg.hyper, reader=cfg.reader)
    # the training table (no evaluation text, no held-out task), encoded once, by the first stage that needs
    # it: a minute of encoding is counted in that stage's time, and a finished build skips it
    table = functools.cache(lambda: training_table(config, suite))

    recon_tasks = [t for t in suite.seen if library_tasks is None or t in set(library_tasks)]
    stage("recon", (b.recon / "model.safetensors").exists(),
          lambda: train_recon(config, suite, b.library, b.recon, loop(cfg.recon), table=table(), tasks=recon_tasks))
    stage("sft", (b.sft / "model.safetensors").exists(),
          lambda: train_sft(config, suite, b.base, b.sft, loop(cfg.sft), table=table(), **cfg.sft_batch))
    result = {}
    if evaluate:
        stage("eval", False, lambda: result.update(run_eval(b.root)))
    build_file = b.root / "build.json"
    if build_file.exists():  # a resumed build: keep the times of the stages done before
        times = {**json.loads(build_file.read_text()).get("stage_seconds", {}), **times}
    build = {"config": asdict(cfg), "stage_seconds": times, "total_seconds": round(sum(times.values()), 1),
             "torch": torch.__version__,
             "threads": torch.get_num_threads(),
             "command": command or command_line(out_dir, cfg.seed, basic=cfg.universe is None, reader=cfg.reader is not None)}
    build_file.write_text(json.dumps(build, indent=1) + "\n")
    return {"build": build, "eval": result}


def command_line(out_dir: str | Path, seed: int, *, basic: bool = False, scaled_down: bool = False, reader: bool = False,
                 base_steps: int | None = None) -> str:
    """The `loragen train demo` command line that builds with these flags, as build.json records it."""
    flags = [f"--out {out_dir}", f"--seed {seed}", "--basic" if basic else "", "--scaled-down" if scaled_down else "",
             "--reader" if reader else "", "" if base_steps is None else f"--base-steps {base_steps}"]
    return " ".join(["loragen train demo", *filter(None, flags)])
