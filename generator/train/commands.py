"""`loragen train ...` and `loragen eval`: argument parsers and commands (imports nothing heavy until run).

    loragen train suite --out suite.json             the demo task suite from a seed
    loragen train base  --suite S --out DIR          pretrain the tiny Llama on instruction-prefixed examples
    loragen train lora  --base B --suite S --task T [--task T2 ...] --out DIR    a PEFT LoRA (oracle or multi-task)
    loragen train lora  --base B --suite S --all --out LIBRARY                   every task's oracle + multi-task
    loragen train recon --base B --suite S --library LIB --out DIR               T2L by reconstruction
    loragen train sft   --base B --suite S --out DIR                              T2L end to end through the base
    loragen train demo  [--out DIR]                  all of the above + evaluation: the demo bundle
    loragen eval [BUNDLE] [--out DIR]                the quality table (markdown + JSON) and the adapter map
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from generator import DEMO_BUNDLE


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="train the demo suite's models: suite | base | lora | recon | sft | demo")
    stages = t.add_subparsers(dest="stage", required=True, parser_class=type(t))

    def loop_args(sp, steps: int, lr: float) -> None:
        sp.add_argument("--steps", type=int, default=steps)
        sp.add_argument("--lr", type=float, default=lr)
        sp.add_argument("--batch-size", type=int, default=32)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--ckpt-every", type=int, default=200, help="steps between resumable checkpoints (0: none)")
        sp.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint is there")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

    s = stages.add_parser("suite", help="write the demo task suite (tasks, descriptions split, examples) as JSON")
    s.add_argument("--out", required=True, metavar="FILE")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--examples", type=int, default=400, help="training examples per task")

    b = stages.add_parser("base", help="pretrain the tiny Llama base model on instruction-prefixed examples")
    b.add_argument("--suite", required=True, metavar="FILE")
    b.add_argument("--out", required=True, metavar="DIR")
    b.add_argument("--hidden", type=int, default=128)
    b.add_argument("--layers", type=int, default=4)
    loop_args(b, 1500, 2e-3)

    lo = stages.add_parser("lora", help="oracle LoRA(s) with PEFT: one task, several (multi-task), or --all")
    lo.add_argument("--base", required=True, metavar="DIR")
    lo.add_argument("--suite", required=True, metavar="FILE")
    which = lo.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", action="append", metavar="NAME", help="a task; repeat for a multi-task LoRA")
    which.add_argument("--all", action="store_true", help="every task's oracle in OUT/<task>/ and OUT/_multitask/")
    lo.add_argument("--out", required=True, metavar="DIR")
    loop_args(lo, 80, 5e-3)

    for name, helptext, steps in (("recon", "T2L reconstruction training from a LoRA library", 1500),
                                  ("sft", "T2L SFT training through the frozen base model", 1200)):
        h = stages.add_parser(name, help=helptext)
        h.add_argument("--base", required=True, metavar="DIR", help="the base model (its dims; SFT trains through it)")
        h.add_argument("--suite", required=True, metavar="FILE")
        h.add_argument("--out", required=True, metavar="DIR")
        h.add_argument("--latent", type=int, default=64)
        h.add_argument("--head-in", type=int, default=128)
        if name == "recon":
            h.add_argument("--library", required=True, metavar="DIR")
        else:
            h.add_argument("--document-share", type=float, default=0.3, help="share of samples conditioned on a document")
        loop_args(h, steps, 1e-3)

    d = stages.add_parser("demo", help="build the whole demo bundle (suite, base, library, T2L recon + SFT, eval)")
    d.add_argument("--out", default=str(DEMO_BUNDLE), metavar="DIR", help=f"default: {DEMO_BUNDLE}")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--scaled-down", action="store_true", help="a one-minute version (tests, smoke checks)")
    d.add_argument("--no-eval", action="store_true")
    d.add_argument("--quiet", action="store_true")

    e = sub.add_parser("eval", help="evaluate a demo bundle: quality table (markdown + JSON) and adapter map")
    e.add_argument("bundle", nargs="?", default=str(DEMO_BUNDLE), metavar="BUNDLE", help=f"default: {DEMO_BUNDLE}")
    e.add_argument("--out", metavar="DIR", help="default: BUNDLE/eval")
    e.add_argument("--examples", type=int, help="evaluation examples per task (default: all in the suite)")


def _loop(args: argparse.Namespace):
    from generator.train.loop import LoopConfig

    return LoopConfig(steps=args.steps, lr=args.lr, seed=args.seed, ckpt_every=args.ckpt_every,
                      progress=not args.quiet, warmup=min(100, max(1, args.steps // 10)))


def _suite(path: str):
    from generator.errors import InputError
    from generator.train.suite import Suite

    try:
        return Suite.load(path)
    except FileNotFoundError:
        raise InputError(f"suite {path} not found; build one with `loragen train suite --out {path}`") from None
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(f"{path} is not a suite file ({type(e).__name__}: {e})") from None


def _dir(path: str, what: str, marker: str) -> Path:
    from generator.errors import InputError

    p = Path(path)
    if not (p / marker).exists():
        raise InputError(f"{what} {path} has no {marker}")
    return p


def _progress_logging(quiet: bool) -> None:
    """The library reports build stages and evaluation rows through logging: on stderr unless --quiet."""
    import logging

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")


def cmd_train(args: argparse.Namespace) -> int:
    from generator.errors import InputError

    _progress_logging(getattr(args, "quiet", False))  # `train suite` has no bar to silence

    if getattr(args, "no_resume", False):
        from generator.train.loop import STATE

        (Path(args.out) / STATE).unlink(missing_ok=True)
    if args.stage == "suite":
        from generator.train.suite import build_suite

        suite = build_suite(args.seed, n_train=args.examples)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        suite.save(args.out)
        print(f"wrote {args.out}: {len(suite.tasks)} tasks ({len(suite.held_out)} held out), "
              f"{sum(map(len, suite.train_descriptions.values()))} training and "
              f"{sum(map(len, suite.eval_descriptions.values()))} evaluation descriptions")
        return 0
    if args.stage == "demo":
        from generator.train.demo import DemoConfig, build_demo

        cfg = DemoConfig.scaled_down(args.seed) if args.scaled_down else DemoConfig().with_seed(args.seed)
        result = build_demo(args.out, cfg, evaluate=not args.no_eval, progress=not args.quiet)
        print(f"built {args.out} in {result['build']['total_seconds']} s (stages: {result['build']['stage_seconds']})")
        if result["eval"]:
            from generator.eval.quality import markdown

            print(markdown(result["eval"]))
        return 0
    if args.steps < 1 or args.batch_size < 1:
        raise InputError("--steps and --batch-size must be positive")
    suite = _suite(args.suite)
    if args.stage == "base":
        from generator.train.basemodel import pretrain_base

        log = pretrain_base(suite, args.out, _loop(args), batch_size=args.batch_size, hidden=args.hidden,
                            layers=args.layers, heads=max(1, args.hidden // 32), intermediate=3 * args.hidden)
    elif args.stage == "lora":
        from generator.train.lora import train_library, train_lora

        base = _dir(args.base, "base model", "config.json")
        if args.all:
            loop = _loop(args)
            logs = train_library(base, suite, args.out, loop, replace(loop, steps=2 * loop.steps), batch_size=args.batch_size)
            print(f"trained {len(logs)} adapters into {args.out}")
            return 0
        log = train_lora(base, suite, args.task, args.out, _loop(args), batch_size=args.batch_size)
    else:
        from generator.train.conditioning import demo_hyper_config

        base = _dir(args.base, "base model", "config.json")
        config = demo_hyper_config(base, latent=args.latent, head_in=args.head_in)
        if args.stage == "recon":
            from generator.train.recon import train_recon

            log = train_recon(config, suite, _dir(args.library, "library", "_multitask"), args.out, _loop(args),
                              batch_size=args.batch_size)
        else:
            from generator.train.sft import train_sft

            log = train_sft(config, suite, base, args.out, _loop(args), batch_size=args.batch_size,
                            document_share=args.document_share)
    print(f"wrote {args.out}: loss {log['loss'][0]:.4f} -> {log['loss'][-1]:.4f} in {log['elapsed_s']:.0f} s "
          f"(train_log.json, loss.png)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from generator.errors import InputError
    from generator.eval.quality import markdown, run_eval

    _progress_logging(quiet=False)
    bundle = Path(args.bundle)
    for part in ("suite.json", "base/config.json", "library", "t2l-sft/config.json"):
        if not (bundle / part).exists():
            raise InputError(f"{bundle} is not a demo bundle (no {part}); build one with `loragen train demo --out DIR`")
    if args.examples is not None and args.examples < 1:
        raise InputError("--examples must be positive")
    result = run_eval(bundle, args.out, n_examples=args.examples)
    print(markdown(result))
    print(f"wrote {Path(args.out) if args.out else bundle / 'eval'}: quality.md, quality.json, adapters.png")
    return 0
