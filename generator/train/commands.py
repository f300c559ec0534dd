"""`loragen train ...` and `loragen eval`: argument parsers and commands (imports nothing heavy until run).

    loragen train suite --out suite.json             the task universe (500+ tasks, three held-out splits)
    loragen train suite --basic --out suite.json     the basic suite (34 tasks, 8 held out)
    loragen train base  --suite S --out DIR          pretrain the tiny Llama on instruction-prefixed examples
    loragen train lora  --base B --suite S --task T [--task T2 ...] --out DIR    a PEFT LoRA (oracle or multi-task)
    loragen train lora  --base B --suite S --all --out LIBRARY                   every task's oracle + multi-task
    loragen train recon --base B --suite S --library LIB --out DIR               T2L by reconstruction
    loragen train sft   --base B --suite S --out DIR                              T2L end to end through the base
lora, recon and sft take any Llama-family Hugging Face causal LM as --base, and the LoRA settings
--target-modules, --rank, --alpha; lora and sft write examples in the prompt format --template names;
recon and sft name the base in the checkpoint they write (--base-id), and with --reader train a hypernetwork
conditioned on the task text's token states (--reader-latents, --reader-width, --reader-heads, --reader-layers,
--reader-max-tokens) instead of one pooled embedding.
    loragen train demo  [--out DIR]                  all of the above + evaluation: the demo bundle
    loragen eval [BUNDLE] [--out DIR]                the quality table (markdown + JSON) and the adapter map
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from generator import DEMO_BUNDLE


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="task suites, base models, oracle LoRAs and hypernetworks: "
                                     "suite | base | lora | recon | sft | distill | demo | scaling")
    stages = t.add_subparsers(dest="stage", required=True, parser_class=type(t))

    def loop_args(sp, steps: int, lr: float) -> None:
        sp.add_argument("--steps", type=int, default=steps)
        sp.add_argument("--lr", type=float, default=lr)
        sp.add_argument("--batch-size", type=int, default=32)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--ckpt-every", type=int, default=200, help="steps between resumable checkpoints (0: none)")
        sp.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint is there")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

    def lora_args(sp, *, template: bool, base_id: bool) -> None:
        # defaults are lora.LoraSettings' (None here: this module imports nothing heavy to build the parser)
        sp.add_argument("--target-modules", metavar="NAMES",
                        help="comma-separated projections of every decoder layer to adapt, among q_proj, k_proj, v_proj, "
                             "o_proj, gate_proj, up_proj, down_proj (default: q_proj,v_proj)")
        sp.add_argument("--rank", type=int, help="LoRA rank r (default: 8)")
        sp.add_argument("--alpha", type=float, help="LoRA alpha; adapters scale B@A by alpha/sqrt(r) (default: 16)")
        if template:
            sp.add_argument("--template", default="auto",
                            help="prompt format of the examples: 'spaced' (the loragen demo layout), 'chat' (the "
                                 "tokenizer's chat template) or a template string with {input} and optionally "
                                 "{instruction}, e.g. '{instruction}\\nInput: {input}\\nOutput: '; default 'auto': "
                                 "spaced for a base written by `loragen train base`, else chat if the tokenizer has a "
                                 "chat template, else that example (see generator/train/prompting.py)")
        if base_id:
            sp.add_argument("--base-id", metavar="ID", help="the base model id generated adapters name (default: "
                            "loragen/demo-base for a base written by `loragen train base`, else the hub id in the "
                            "base's config.json, else its directory name)")

    def reader_args(sp) -> None:
        # defaults are config.ReaderSpec's (None here, so that a size given without --reader is caught)
        sp.add_argument("--reader", action="store_true",
                        help="condition on the task text's token states, read by cross-attention from learned latent "
                             "queries, instead of one pooled sentence embedding (keeps word order: 'add' vs 'subtract')")
        sp.add_argument("--reader-latents", type=int, metavar="Q", help="latent queries of the reader (default: 16)")
        sp.add_argument("--reader-width", type=int, metavar="W", help="the reader's width (default: 256)")
        sp.add_argument("--reader-heads", type=int, metavar="N", help="attention heads; must divide the width (default: 4)")
        sp.add_argument("--reader-layers", type=int, metavar="N", help="reader blocks (default: 2)")
        sp.add_argument("--reader-max-tokens", type=int, metavar="T",
                        help="tokens read per text; a long document's windows are concatenated up to this (default: 1024)")
        sp.add_argument("--reader-pooled-skip", action="store_const", const=True,
                        help="also feed the first token's state (the pooled embedding) straight to the task code; the "
                             "reader's part starts at zero, so training starts from the pooled hypernetwork")

    def suite_choice(sp) -> None:
        which = sp.add_mutually_exclusive_group()
        which.add_argument("--basic", dest="universe", action="store_false",
                           help="the basic suite (34 tasks, 8 held out) instead of the task universe")
        which.add_argument("--universe", dest="universe", action="store_true", default=True,
                           help="the task universe: hundreds of tasks from parametric families and compositions, with "
                                "three held-out splits (new parameter values, new compositions, new families); the default")

    def tasks_arg(sp) -> None:
        sp.add_argument("--tasks", "--suite", dest="suite", required=True, metavar="FILE",
                        help="a task collection (JSONL, one task per line) or a suite file from `loragen train suite`")

    s = stages.add_parser("suite", help="write a task suite (tasks, descriptions split, examples) as JSON: the task "
                                        "universe, or with --basic the 34-task suite")
    s.add_argument("--out", required=True, metavar="FILE")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--examples", type=int, help="training examples per task (default: 200 in the universe, 400 in the "
                                                "basic suite)")
    suite_choice(s)

    b = stages.add_parser("base", help="pretrain the tiny Llama base model on instruction-prefixed examples")
    tasks_arg(b)
    b.add_argument("--out", required=True, metavar="DIR")
    b.add_argument("--hidden", type=int, default=128)
    b.add_argument("--layers", type=int, default=4)
    b.add_argument("--pack", type=int, default=3, help="examples per training sequence, after one instruction; 1 makes "
                   "every answer depend on the instruction, more lets later answers copy the task from earlier ones")
    b.add_argument("--focus", type=float, default=0.0, help="share of the training sequences drawn in proportion to "
                   "each task's loss, measured again at every checkpoint (0 to 1; default 0: every task alike)")
    loop_args(b, 1500, 2e-3)

    lo = stages.add_parser("lora", help="oracle LoRA(s) with PEFT: one task, several (multi-task), or --all")
    lo.add_argument("--base", required=True, metavar="DIR")
    tasks_arg(lo)
    which = lo.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", action="append", metavar="NAME", help="a task; repeat for a multi-task LoRA")
    which.add_argument("--all", action="store_true", help="every task's oracle in OUT/<task>/ and OUT/_multitask/")
    lo.add_argument("--out", required=True, metavar="DIR")
    lora_args(lo, template=True, base_id=False)
    loop_args(lo, 80, 5e-3)

    for name, helptext, steps in (("recon", "T2L reconstruction training from a LoRA library", 1500),
                                  ("sft", "T2L SFT training through the frozen base model", 1200)):
        h = stages.add_parser(name, help=helptext)
        h.add_argument("--base", required=True, metavar="DIR", help="the base model (its dims; SFT trains through it)")
        tasks_arg(h)
        h.add_argument("--out", required=True, metavar="DIR")
        h.add_argument("--latent", type=int, default=64)
        h.add_argument("--head-in", type=int, default=128)
        if name == "recon":
            h.add_argument("--library", required=True, metavar="DIR")
        else:
            h.add_argument("--document-share", type=float, default=0.3, help="share of samples conditioned on a document")
            h.add_argument("--pack", type=int, default=2, help="examples per training sample (default 2); 1 trains on "
                           "prompts as they are served: one input, no earlier pair of the task to copy from")
            h.add_argument("--buckets", type=int, help="base-model passes per step, each over samples of similar "
                           "length: the same loss with less padding (default 2; 1: one padded pass)")
        lora_args(h, template=name == "sft", base_id=True)
        h.add_argument("--pooling", choices=["cls", "mean"],
                       help="how the encoder's token states become one task embedding: its first token's state (T2L's "
                            "way, default) or their mean (how the demo's MiniLM encoder was trained to embed sentences)")
        reader_args(h)
        h.add_argument("--dropout", type=float, default=0.0, help="dropout inside the hypernetwork while it trains "
                       "(its input mixer, residual blocks and reader; none at generation), 0 to <1 (default 0)")
        h.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the hypernetwork (default 0)")
        loop_args(h, steps, 1e-3)

    di = stages.add_parser("distill", help="a Doc-to-LoRA hypernetwork by context distillation: the base with the "
                           "adapter it generates from a description answers as the base with the description in its prompt")
    di.add_argument("--base", required=True, metavar="DIR", help="the base model (a causal LM whose tokenizer has a chat "
                    "template): it reads the descriptions, teaches, and receives the adapters")
    tasks_arg(di)
    di.add_argument("--out", required=True, metavar="DIR")
    di.add_argument("--teacher", choices=["description", "program"], default="description",
                    help="the teacher's instruction: the description the adapter is made from (default), or the task's "
                         "program where the suite has one")
    di.add_argument("--ce-weight", type=float, default=0.0, help="add this times the cross-entropy on the answers (default 0)")
    di.add_argument("--document-share", type=float, default=0.0, help="share of samples made from a training document")
    di.add_argument("--target-modules", metavar="NAMES", default="down_proj",
                    help="comma-separated projections to adapt (default: down_proj, as the released checkpoints)")
    di.add_argument("--rank", type=int, default=8, help="rank r of one chunk's LoRA (default 8)")
    di.add_argument("--latent", type=int, default=128, help="the Perceiver's width D (default 128)")
    di.add_argument("--latent-queries", type=int, default=8, help="the Perceiver encoder's queries (default 8)")
    di.add_argument("--blocks", type=int, default=2, help="the Perceiver encoder's cross-attention layers (default 2)")
    di.add_argument("--chunk-tokens", type=int, default=0, help="tokens per chunk of a long text (default 0: one chunk)")
    di.add_argument("--template", default="auto", help="prompt format of the examples, as for `train sft`")
    di.add_argument("--base-id", metavar="ID", help="the base model id generated adapters name (default: the hub id in "
                    "the base's config.json, else its directory)")
    loop_args(di, 500, 1e-3)

    d = stages.add_parser("demo", help="build the whole demo bundle (suite, base, library, T2L recon + SFT, eval)")
    d.add_argument("--out", default=str(DEMO_BUNDLE), metavar="DIR", help=f"default: {DEMO_BUNDLE}")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--scaled-down", action="store_true", help="a one-minute version (tests, smoke checks)")
    suite_choice(d)
    d.add_argument("--base-steps", type=int, metavar="N", help="base-model pretraining steps (default: the build's; "
                   "8500 on the universe)")
    d.add_argument("--no-eval", action="store_true")
    d.add_argument("--quiet", action="store_true")
    reader_args(d)

    sc = stages.add_parser("scaling", help="the scaling study: T2L SFT trained on 32, 128, ... tasks of a bundle, "
                                           "each evaluated on every split (table and plot)")
    sc.add_argument("--bundle", default=str(DEMO_BUNDLE), metavar="DIR", help=f"default: {DEMO_BUNDLE}")
    sc.add_argument("--sizes", default="32,128,512,all", help="numbers of seen tasks, comma separated; 'all' for every one")
    sc.add_argument("--out", required=True, metavar="DIR")
    sc.add_argument("--steps", type=int, help="SFT steps for every size (default: the bundle's own SFT's, from its "
                    "build.json; else 1200)")
    sc.add_argument("--batch-size", type=int, help="SFT samples per step (default: the bundle's own SFT's; else 32)")
    sc.add_argument("--pack", type=int, help="examples per SFT sample (default: the bundle's own SFT's; else 2)")
    sc.add_argument("--seed", type=int, default=0, help="draws the nested task subsets and seeds training")
    sc.add_argument("--examples", type=int, help="evaluation examples per task (default: all in the suite)")
    sc.add_argument("--quiet", action="store_true")
    reader_args(sc)  # --reader: every size trains a token-reader hypernetwork instead of the bundle's conditioning

    e = sub.add_parser("eval", help="evaluate a demo bundle: quality table (markdown + JSON) and adapter map")
    e.add_argument("bundle", nargs="?", default=str(DEMO_BUNDLE), metavar="BUNDLE", help=f"default: {DEMO_BUNDLE}")
    e.add_argument("--out", metavar="DIR", help="default: BUNDLE/eval")
    e.add_argument("--examples", type=int, help="evaluation examples per task (default: all in the suite)")
    e.add_argument("--sft", metavar="DIR", help="evaluate this T2L SFT checkpoint (trained for the bundle's base model) "
                                               "in place of the bundle's own t2l-sft/")


def _loop(args: argparse.Namespace):
    from generator.train.loop import LoopConfig

    return LoopConfig(steps=args.steps, lr=args.lr, seed=args.seed, ckpt_every=args.ckpt_every,
                      progress=not args.quiet, warmup=min(100, max(1, args.steps // 10)),
                      weight_decay=getattr(args, "weight_decay", 0.0))


def _suite(path: str, seed: int = 0):
    """A suite file (`loragen train suite`) or a task collection (JSONL, see generator/train/tasks.py)."""
    import json

    from generator.errors import InputError
    from generator.train.suite import Suite
    from generator.train.tasks import load_tasks, suite_from_tasks

    p = Path(path)
    if not p.is_file():
        raise InputError(f"task file {path} not found; write a JSONL task collection (one task per line) or "
                         f"build a suite with `loragen train suite --out {path}`")
    if p.suffix != ".jsonl":
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            d = None  # not one JSON document: read it as JSONL, whose errors name the line
        if isinstance(d, dict) and "train_examples" in d:
            try:
                return Suite.from_dict(d)
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                raise InputError(f"{path} is not a valid suite file ({type(e).__name__}: {e})") from None
    return suite_from_tasks(load_tasks(p), seed)


def _dir(path: str, what: str, marker: str) -> Path:
    from generator.errors import InputError

    p = Path(path)
    if not (p / marker).exists():
        raise InputError(f"{what} {path} has no {marker}")
    return p


def _template(args: argparse.Namespace) -> str:
    """--template, with \\n in it read as a newline (a shell passes it as two characters), checked before any
    model loads; the named formats are checked against the base's tokenizer when it loads."""
    from generator.train.prompting import check_template_flag

    template = args.template.replace("\\n", "\n")
    check_template_flag(template)
    return template


def _lora_settings(args: argparse.Namespace):
    """--target-modules, --rank, --alpha (their defaults: LoraSettings')."""
    from generator.train.lora import DEFAULT_LORA, LoraSettings

    d = DEFAULT_LORA
    modules = d.target_modules if args.target_modules is None else LoraSettings.parse_modules(args.target_modules)
    return LoraSettings(modules, d.r if args.rank is None else args.rank, d.alpha if args.alpha is None else args.alpha)


READER_FLAGS = {"latents": "--reader-latents", "width": "--reader-width", "heads": "--reader-heads",
                "layers": "--reader-layers", "max_tokens": "--reader-max-tokens", "pooled_skip": "--reader-pooled-skip"}


def _reader_spec(args: argparse.Namespace):
    """--reader and its sizes (their defaults: ReaderSpec's) → a ReaderSpec, or None without --reader."""
    from generator.config import ReaderSpec
    from generator.errors import ConfigError, InputError

    given = {field: getattr(args, f"reader_{field}") for field in READER_FLAGS if getattr(args, f"reader_{field}") is not None}
    if not args.reader:
        if given:
            raise InputError(f"{', '.join(READER_FLAGS[f] for f in given)} size the token reader; add --reader to train one")
        return None
    try:
        return ReaderSpec(**given)
    except ConfigError as e:
        flags = {f"reader.{f}": flag for f, flag in READER_FLAGS.items()}
        message = str(e)
        for key, flag in flags.items():
            message = message.replace(key, flag)
        raise InputError(message) from None


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
        from generator.train.universe import UniverseConfig, build_universe_suite

        if args.examples is not None and args.examples < 1:
            raise InputError("--examples must be positive")
        if args.universe:
            ucfg = UniverseConfig(seed=args.seed)
            suite = build_universe_suite(replace(ucfg, n_train_examples=args.examples or ucfg.n_train_examples))
        else:
            suite = build_suite(args.seed, n_train=args.examples or 400)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        suite.save(args.out)
        splits = ", ".join(f"{name} {len(tasks)}" for name, tasks in suite.held_out_splits.items())
        print(f"wrote {args.out}: {len(suite.tasks)} tasks ({len(suite.held_out)} held out: {splits}), "
              f"{sum(map(len, suite.train_descriptions.values()))} training and "
              f"{sum(map(len, suite.eval_descriptions.values()))} evaluation descriptions")
        return 0
    if args.stage == "scaling":
        return _scaling(args)
    if args.stage == "demo":
        from generator.train.demo import build_demo

        result = build_demo(args.out, demo_config(args), evaluate=not args.no_eval, progress=not args.quiet,
                            command=demo_command(args))
        print(f"built {args.out} in {result['build']['total_seconds']} s (stages: {result['build']['stage_seconds']})")
        if result["eval"]:
            from generator.eval.quality import markdown

            print(markdown(result["eval"]))
        return 0
    if args.steps < 1 or args.batch_size < 1:
        raise InputError("--steps and --batch-size must be positive")
    if args.stage in ("recon", "sft"):
        from generator.train.sft import check_dropout

        check_dropout(args.dropout)  # flags first: before any file is read
        if args.weight_decay < 0:
            raise InputError(f"--weight-decay must be at least 0, got {args.weight_decay}")
    suite = _suite(args.suite, args.seed)
    if args.stage == "distill":
        log = _distill(args, suite)
    elif args.stage == "base":
        from generator.train.basemodel import pretrain_base

        if args.pack < 1:
            raise InputError("--pack must be positive")
        log = pretrain_base(suite, args.out, _loop(args), batch_size=args.batch_size, pack=args.pack, hidden=args.hidden,
                            layers=args.layers, heads=max(1, args.hidden // 32), intermediate=3 * args.hidden,
                            focus=args.focus)
    elif args.stage == "lora":
        from generator.train.lora import train_library, train_lora

        base = _dir(args.base, "base model", "config.json")
        lora, template = _lora_settings(args), _template(args)
        if args.all:
            loop = _loop(args)
            logs = train_library(base, suite, args.out, loop, replace(loop, steps=2 * loop.steps), batch_size=args.batch_size,
                                 lora=lora, template=template)
            print(f"trained {len(logs)} adapters into {args.out}")
            return 0
        log = train_lora(base, suite, args.task, args.out, _loop(args), batch_size=args.batch_size, lora=lora,
                         template=template)
    else:
        from generator.train.conditioning import hyper_config

        base = _dir(args.base, "base model", "config.json")
        template = _template(args) if args.stage == "sft" else None
        if args.base_id is not None and not args.base_id.strip():
            raise InputError("--base-id must name the base model, e.g. Qwen/Qwen2.5-0.5B-Instruct")
        from generator.config import EncoderSpec

        config = hyper_config(base, lora=_lora_settings(args), base_model=args.base_id, latent=args.latent,
                              head_in=args.head_in, reader=_reader_spec(args),
                              encoder=EncoderSpec(pooling=args.pooling) if args.pooling else None)
        if args.stage == "recon":
            from generator.train.recon import train_recon

            log = train_recon(config, suite, _dir(args.library, "library", "_multitask"), args.out, _loop(args),
                              batch_size=args.batch_size, dropout=args.dropout)
        else:
            from generator.train.sft import SFT_BUCKETS, train_sft

            buckets = SFT_BUCKETS if args.buckets is None else args.buckets
            if args.pack < 1 or buckets < 1:
                raise InputError("--pack and --buckets must be positive")
            log = train_sft(config, suite, base, args.out, _loop(args), batch_size=args.batch_size, pack=args.pack,
                            document_share=args.document_share, template=template, dropout=args.dropout,
                            buckets=buckets)
    print(f"wrote {args.out}: loss {log['loss'][0]:.4f} -> {log['loss'][-1]:.4f} in {log['elapsed_s']:.0f} s "
          f"(train_log.json, loss.png)")
    return 0


def _distill(args: argparse.Namespace, suite) -> dict:
    from generator.errors import ConfigError, InputError
    from generator.train.distill import d2l_config, train_distill
    from generator.train.lora import LoraSettings

    if args.base_id is not None and not args.base_id.strip():
        raise InputError("--base-id must name the base model, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    base = _dir(args.base, "base model", "config.json")
    try:
        config = d2l_config(base, base_model=args.base_id, modules=LoraSettings.parse_modules(args.target_modules),
                            r=args.rank, latent=args.latent, latent_queries=args.latent_queries, blocks=args.blocks,
                            chunk_tokens=args.chunk_tokens)
    except ConfigError as e:
        raise InputError(str(e)) from None
    return train_distill(config, suite, base, args.out, _loop(args), batch_size=args.batch_size, teacher=args.teacher,
                         ce_weight=args.ce_weight, document_share=args.document_share, template=_template(args))


def demo_config(args: argparse.Namespace):
    """The DemoConfig `loragen train demo` builds with: the committed bundle's build (or the basic suite's, or
    the scaled-down one), with the reader and base-model steps the flags give. InputError on a bad flag."""
    from generator.errors import InputError
    from generator.train.demo import DemoConfig

    if args.base_steps is not None and args.base_steps < 1:
        raise InputError("--base-steps must be positive")
    if args.universe:  # the default: the committed bundle's build
        cfg = DemoConfig.scaled_down_universe(args.seed) if args.scaled_down else DemoConfig.universe_build(args.seed)
    else:
        cfg = DemoConfig.scaled_down(args.seed) if args.scaled_down else DemoConfig().with_seed(args.seed)
    reader = _reader_spec(args)
    if reader is not None:
        cfg = replace(cfg, reader=reader)
    if args.base_steps is not None:
        cfg = replace(cfg, base=replace(cfg.base, steps=args.base_steps))
    return cfg


def demo_command(args: argparse.Namespace) -> str:
    """The `loragen train demo` command line of these arguments, as build.json records it."""
    from generator.train.demo import command_line

    return command_line(args.out, args.seed, basic=not args.universe, scaled_down=args.scaled_down,
                        reader=_reader_spec(args) is not None, base_steps=args.base_steps)


def _scaling(args: argparse.Namespace) -> int:
    from generator.errors import InputError
    from generator.eval.scaling import markdown, parse_sizes, run_scaling
    from generator.train.loop import LoopConfig
    from generator.train.suite import Suite

    bundle = _bundle(args.bundle)
    own = _bundle_sft_settings(bundle)
    steps, batch_size, pack = (own[k] if getattr(args, k) is None else getattr(args, k) for k in ("steps", "batch_size", "pack"))
    if min(steps, batch_size, pack) < 1 or (args.examples is not None and args.examples < 1):
        raise InputError("--steps, --batch-size, --pack and --examples must be positive")
    sizes = parse_sizes(args.sizes, len(Suite.load(bundle / "suite.json").seen))
    cfg = LoopConfig(steps=steps, lr=1e-3, warmup=min(50, max(1, steps // 10)), ckpt_every=200,
                     log_every=25, progress=not args.quiet)
    reader = _reader_spec(args)
    command = (f"loragen train scaling --bundle {args.bundle} --sizes {args.sizes} --steps {steps} --batch-size {batch_size} "
               f"--pack {pack} --seed {args.seed}" + (" --reader" if reader else ""))
    result = run_scaling(bundle, args.out, sizes, cfg, seed=args.seed, n_examples=args.examples, command=command,
                         reader=reader, batch_size=batch_size, pack=pack)
    print(markdown(result))
    print(f"wrote {args.out}: scaling.md, scaling.json, scaling.png")
    return 0


def _bundle_sft_settings(bundle: Path) -> dict:
    """The steps, batch size and pack of the bundle's own SFT, from the build.json `loragen train demo` wrote
    (what the scaling study repeats per size); for a bundle without one, or built before sft_batch, those of
    the basic build (`DemoConfig()`: 1200 / 32 / 2)."""
    from generator.train.demo import DemoConfig

    basic = DemoConfig()
    settings = {"steps": basic.sft.steps, **basic.sft_batch}
    try:
        config = json.loads((bundle / "build.json").read_text(encoding="utf-8"))["config"]
        own = {"steps": config["sft"]["steps"], **config.get("sft_batch", {})}  # a bundle built before sft_batch: 32 x 2
        settings.update({k: int(own[k]) for k in settings if k in own})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return settings


def _bundle(path: str) -> Path:
    from generator.errors import InputError

    bundle = Path(path)
    for part in ("suite.json", "base/config.json", "library", "t2l-sft/config.json"):
        if not (bundle / part).exists():
            raise InputError(f"{bundle} is not a demo bundle (no {part}); build one with `loragen train demo --out DIR`")
    return bundle


def cmd_eval(args: argparse.Namespace) -> int:
    from generator.errors import InputError
    from generator.eval.quality import markdown, run_eval

    _progress_logging(quiet=False)
    bundle = _bundle(args.bundle)
    if args.examples is not None and args.examples < 1:
        raise InputError("--examples must be positive")
    if args.sft is not None and not (Path(args.sft) / "config.json").is_file():
        raise InputError(f"--sft {args.sft}: no native checkpoint there (config.json); give a directory written by "
                         "`loragen train sft`")
    result = run_eval(bundle, args.out, n_examples=args.examples, sft=args.sft)
    print(markdown(result))
    print(f"wrote {Path(args.out) if args.out else bundle / 'eval'}: quality.md, quality.json, adapters.png")
    return 0
