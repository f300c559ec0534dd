"""`loragen` command line: serve | worker | generate | try | inspect | convert | check-adapter | combine | train | eval |
bench.

Errors a user can cause print one line on stderr and exit with status 2; nothing heavy is imported until
a command runs, so `loragen --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from generator import __version__  # light: generator/__init__ imports no torch

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is one `--help` away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="loragen", description="Generated LoRA adapters on demand (Text-to-LoRA).")
    p.add_argument("--version", action="version", version=f"loragen {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def checkpoint_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--base-model", help="override the base model hub id written into adapters")
        sp.add_argument("--module-order", type=_names, help="T2L import only: the training-time module "
                        "index order, comma separated, when it differs from adapter_config.json")

    def node_args(sp: argparse.ArgumentParser, api: bool) -> None:
        """Flags of serve and worker; each overrides its LORAGEN_* environment variable."""
        sp.add_argument("--checkpoint", action="append", metavar="[ID=]SRC", dest="checkpoints",
                        help="a checkpoint: directory or hf:// source, optionally named ID=; repeatable")
        sp.add_argument("--host")
        sp.add_argument("--port", type=int)
        sp.add_argument("--redis-url", help="Redis for the cache (and the job stream); default: in-process LRU")
        sp.add_argument("--queue-redis-url", help="Redis for the job stream, heartbeats, locks and rate limits "
                        "(maxmemory-policy noeviction); default: the --redis-url one")
        sp.add_argument("--device", help="auto, cpu, cuda:N or a comma-separated list (a worker each)")
        sp.add_argument("--compute-dtype", choices=["float32", "bfloat16"])
        sp.add_argument("--trust-remote-code", action="store_true", default=None,
                        help="allow encoders that ship code (needed by released T2L checkpoints)")
        sp.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
        if api:
            sp.add_argument("--default-checkpoint", metavar="ID")
            sp.add_argument("--queue", choices=["local", "redis"],
                            help="local: generate in this process (default); redis: API node for `loragen worker`s")
            sp.add_argument("--embedded-worker", action="store_true", default=None,
                            help="with --queue redis: this node also generates, and `loragen worker`s join it")
            sp.add_argument("--api-processes", type=int, metavar="N",
                            help="N API processes on the port, handing misses through Redis (--redis-url) to one "
                                 "model-holding worker process started beside them (default 1: this process "
                                 "generates)")
            # what --api-processes gives its API processes: bind the port with SO_REUSEPORT, beside each other
            sp.add_argument("--reuse-port", action="store_true", default=None, help=argparse.SUPPRESS)

    node_args(sub.add_parser("serve", help="run the HTTP service (flags override LORAGEN_* environment variables)"),
              api=True)
    node_args(sub.add_parser("worker", help="a generation node for `loragen serve --queue redis` (health on :8001)"),
              api=False)

    g = sub.add_parser("generate", help="generate a PEFT adapter directory from a task, document or embedding")
    g.add_argument("--checkpoint", metavar="SRC", help="directory or hf://owner/repo[/sub][@rev] (default: the demo "
                   "bundle's T2L, the one `loragen serve` serves)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", metavar="TEXT", help="a description of the task")
    src.add_argument("--document", metavar="FILE", help="a text file; long documents are chunked")
    src.add_argument("--embedding", metavar="FILE", help="safetensors file with one tensor [E] or [1, E]")
    g.add_argument("--out", required=True, metavar="DIR", help="output PEFT directory")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="adapter dtype (default: the compute dtype, so bfloat16 compute writes bfloat16 adapters)")
    g.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="hypernetwork compute dtype (bfloat16 is faster on AVX-512 BF16 CPUs and GPUs)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow an encoder that ships its own code (gte-large-en-v1.5 of released T2L)")
    g.add_argument("--base-dir", metavar="DIR", help="Doc-to-LoRA: the base model's directory, when the checkpoint's "
                   "base_model_name_or_path does not resolve here")
    g.add_argument("--chunk-tokens", type=int, metavar="N", help="Doc-to-LoRA: tokens per chunk of a long document "
                   "(0: one chunk, the default of the reference's evaluation; default: the checkpoint's)")
    checkpoint_args(g)

    t = sub.add_parser("try", help="run an adapter on the demo base model: its answers without and with the adapter")
    t.add_argument("--adapter", required=True, metavar="PATH",
                   help="a PEFT directory, or the .safetensors file POST /generate returns")
    given = t.add_mutually_exclusive_group(required=True)
    given.add_argument("--input", action="append", dest="inputs", metavar="X", help="an input, e.g. jcdg; repeatable")
    given.add_argument("--examples", metavar="TASK", help="the evaluation examples of a task of the bundle's suite")
    t.add_argument("-n", type=int, default=8, help="how many examples of --examples TASK (default 8)")
    t.add_argument("--bundle", metavar="DIR", help="a bundle from `loragen train demo` (default: the demo bundle)")

    i = sub.add_parser("inspect", help="print a checkpoint's base model, variant, modules, dims and size")
    i.add_argument("source", metavar="SRC")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    checkpoint_args(i)

    c = sub.add_parser("convert", help="convert a released T2L or Doc-to-LoRA checkpoint to the native format")
    c.add_argument("source", metavar="SRC")
    c.add_argument("out", metavar="OUT_DIR")
    checkpoint_args(c)

    k = sub.add_parser("check-adapter", help="check that a PEFT adapter loads, as itself, into PEFT, vLLM or LoRAX")
    k.add_argument("path", metavar="FILE|DIR", help="a PEFT directory, or a .safetensors file with its config in its "
                   "metadata (what POST /generate returns)")
    k.add_argument("--for", dest="consumer", choices=["peft", "vllm", "lorax"], default="peft",
                   help="where the adapter is going (default peft: a plain LoRA in PEFT's layout)")
    k.add_argument("--max-lora-rank", type=int, metavar="N", help="the server's --max-lora-rank: r must not exceed it")

    s = sub.add_parser("combine", help="stack adapter files of one base model and its modules into one adapter, "
                       "a weight each (its update: the weighted sum of theirs)")
    s.add_argument("files", nargs="+", metavar="FILE", help="2 to 32 adapters: .safetensors files with their config in "
                   "their metadata (what POST /generate returns) or PEFT directories loragen wrote")
    s.add_argument("--weights", type=_weights, metavar="W,W,...", help="one weight per FILE, comma separated "
                   "(default: 1 each)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="the stacked adapter's dtype (default: the files' common dtype, else float32)")
    s.add_argument("--out", required=True, metavar="OUT", help="OUT.safetensors: one file carrying its config, as "
                   "the API answers; any other path: a PEFT directory")

    # every argument after `bench` goes to the suite (main() hands them over before parsing): `loragen bench --help`
    sub.add_parser("bench", add_help=False,
                   help="run the benchmark suite of a source checkout: JSON + markdown report (see `loragen bench --help`)")

    from generator.train.commands import add_parsers  # argparse only: nothing heavy is imported

    add_parsers(sub)
    return p


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated module names, e.g. v_proj,q_proj")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    from generator.errors import LoragenError

    try:
        return COMMANDS[args.command](args)
    except LoragenError as e:
        print(f"loragen: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # an output directory we cannot write, a full disk
        print(f"loragen: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _settings(args: argparse.Namespace, **defaults):
    """Settings from env, overridden by the flags the user gave: CLI > env > default."""
    import os

    from pydantic import ValidationError

    from service.settings import Settings, parse_checkpoint_arg

    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("command", "checkpoints", "reuse_port") and v is not None}
    for key, value in defaults.items():  # a command's own default, below env and flags
        if f"LORAGEN_{key.upper()}" not in os.environ:
            overrides.setdefault(key, value)
    if args.checkpoints:
        overrides["checkpoints"] = dict(parse_checkpoint_arg(c) for c in args.checkpoints)
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"]))  # empty for a check across settings, whose message names them
        raise _usage(f"invalid setting {where}: {err['msg']}" if where else
                     f"invalid settings: {err['msg'].removeprefix('Value error, ')}") from None
    if not settings.checkpoints:
        raise _usage("no checkpoint to serve: name one with --checkpoint [ID=]DIR_OR_HF_SOURCE "
                     "or LORAGEN_CHECKPOINTS='id=source'")
    if settings.default_checkpoint and settings.default_checkpoint not in settings.checkpoints:
        raise _usage(f"--default-checkpoint {settings.default_checkpoint} is not among {list(settings.checkpoints)}")
    return settings


def _logging(level: str, models: bool = True) -> None:
    """Every line a node writes, from the first, is a log record in one format ending in `request_id=`
    (service.logctx): uvicorn's lines too (their Config gets log_config=None, so they reach the root
    handler), and Python warnings from the libraries; no progress bars (transformers draws one per load;
    `models` False: a process that loads none, which need not import transformers)."""
    import logging

    from service.logctx import tag_log_lines

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.captureWarnings(True)
    if models:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tag_log_lines()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app, load_checkpoints, load_generators

    settings = _settings(args)
    if settings.queue == "redis" and not settings.redis_url:
        raise _usage("--queue redis needs --redis-url (or LORAGEN_REDIS_URL): the job stream lives in Redis")
    if settings.api_processes > 1:
        return _serve_processes(settings)
    _logging(settings.log_level)
    sockets = None
    if args.reuse_port:  # one of several API processes on the port (service/processes.py)
        from service.processes import reuse_port_socket

        sockets = [reuse_port_socket(settings.host, settings.port, listen=True)]
    # load before the server starts: a bad checkpoint is one line and exit 2, not a traceback
    api_only = settings.queue == "redis" and not settings.embedded_worker
    loaded = load_checkpoints(settings) if api_only else load_generators(settings)
    # log_config=None: uvicorn's own lines (startup, access) go through the root handler set up above, in
    # one format with ours
    server = uvicorn.Server(uvicorn.Config(create_app(settings, loaded), host=settings.host, port=settings.port,
                                           log_level=settings.log_level, log_config=None,
                                           timeout_graceful_shutdown=settings.shutdown_grace_s))
    server.run(sockets=sockets)
    return 0 if server.started else 3  # uvicorn's exit status for a startup failure (its lifespan logged why)


def _serve_processes(settings) -> int:
    """`serve --api-processes N` (N > 1): check what only this mode needs, then supervise the processes."""
    import socket

    from service.processes import port_answers, reuse_port_socket, serve_processes

    n = settings.api_processes
    if not settings.redis_url:
        raise _usage(f"--api-processes {n} needs --redis-url (or LORAGEN_REDIS_URL): the API processes hand their "
                     "misses to the model worker through the Redis job stream")
    if settings.queue == "redis" or settings.embedded_worker:
        raise _usage(f"--api-processes {n} starts its own model worker and API processes; it does not combine with "
                     "--queue redis or --embedded-worker (for API nodes and workers of your own, run "
                     "`loragen serve --queue redis` and `loragen worker`)")
    if not hasattr(socket, "SO_REUSEPORT"):
        raise _usage(f"--api-processes {n} needs SO_REUSEPORT (Linux, BSD, macOS), which this system lacks")
    if settings.port and port_answers(settings.host, settings.port):
        raise _usage(f"port {settings.port} on {settings.host} is already in use")
    try:
        reuse_port_socket(settings.host, settings.port, listen=False).close()
    except OSError as e:
        raise _usage(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}") from None
    _logging(settings.log_level, models=False)
    return serve_processes(settings)


def cmd_worker(args: argparse.Namespace) -> int:
    import asyncio

    from service.app import load_generators
    from service.metrics import Metrics
    from service.queue import run_worker

    settings = _settings(args, port=8001)
    if not settings.redis_url:
        raise _usage("a worker needs --redis-url (or LORAGEN_REDIS_URL): it takes its jobs from Redis")
    _logging(settings.log_level)
    return asyncio.run(run_worker(settings, load_generators(settings), Metrics()))  # 1: a stream consumer died


def _usage(message: str):
    from generator.errors import LoragenError

    return LoragenError(message)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from generator import DEMO_CHECKPOINTS
    from generator.checkpoint import load_checkpoint
    from generator.errors import InputError
    from generator.pipeline import LoraGenerator, TaskInput

    if args.task is not None:
        item = TaskInput.task(args.task)
    elif args.document is not None:
        item = TaskInput.document(_read_text(args.document))
    else:
        item = TaskInput.from_embedding(_read_embedding(args.embedding))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    if args.chunk_tokens is not None and args.chunk_tokens < 0:
        raise InputError(f"--chunk-tokens {args.chunk_tokens}: give 0 (no chunking) or a positive token count")
    ckpt = load_checkpoint(args.checkpoint or str(DEMO_CHECKPOINTS["demo"]), module_order=args.module_order,
                           base_model=args.base_model)
    kwargs = dict(device=args.device, compute_dtype=getattr(torch, args.compute_dtype),
                  trust_remote_code=args.trust_remote_code)
    if ckpt.kind == "d2l":
        from generator.d2l.generator import DocLoraGenerator

        gen = DocLoraGenerator(ckpt, base_dir=args.base_dir, chunk_tokens=args.chunk_tokens, **kwargs)
    elif args.base_dir is not None or args.chunk_tokens is not None:
        raise InputError("--base-dir and --chunk-tokens apply to Doc-to-LoRA checkpoints; this one is a T2L checkpoint, "
                         "whose adapters need no base model")
    else:
        gen = LoraGenerator(ckpt, **kwargs)
    (adapter,) = gen.generate([item], dtype=args.dtype or args.compute_dtype)
    out = adapter.save_pretrained(args.out)
    extra = (f", {adapter.provenance['chunks']} chunk(s), rank {adapter.provenance['rank']} in r {adapter.config['r']}"
             if ckpt.kind == "d2l" else "")
    print(f"wrote {out} ({adapter.safetensors_size()} bytes, {len(adapter.tensors)} tensors, "
          f"base {gen.config.base_model}{extra}, input {adapter.provenance['input_sha256'][:16]})")
    return 0


def cmd_try(args: argparse.Namespace) -> int:
    from generator import DEMO_BUNDLE
    from generator.errors import InputError
    from generator.eval.trial import run_trial

    if args.n < 1:
        raise InputError(f"-n {args.n}: give at least 1 example")
    trials = run_trial(args.bundle or DEMO_BUNDLE, args.adapter, args.inputs or (), args.examples, args.n)
    expected = args.examples is not None
    width = max(10, *(len(t.input) for t in trials))
    print(f"{'input':>{width}}  " + (f"{'expected':>{width}}  " if expected else "") + f"{'base model':>{width}}  "
          f"{'with adapter':>{width}}")
    for t in trials:
        mark = "" if t.correct is None else "  ✓" if t.correct else "  ✗"
        print(f"{t.input:>{width}}  " + (f"{t.expected:>{width}}  " if expected else "") + f"{t.base:>{width}}  "
              f"{t.adapted:>{width}}{mark}")
    if expected:
        n, base, adapted = len(trials), sum(t.base_correct for t in trials), sum(t.correct for t in trials)
        print(f"exact match: base model {base}/{n}, with adapter {adapted}/{n}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from generator.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.source, module_order=args.module_order, base_model=args.base_model)
    info = ckpt.describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "modules":
            value = ", ".join(f"{m} {d['d_in']}->{d['d_out']}" for m, d in value.items())
        elif key == "perceiver":
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif key == "chunk_tokens" and value is None:
            value = "none (a document is one chunk unless --chunk-tokens says otherwise)"
        elif key == "reader":
            value = ("none (one pooled embedding per text)" if value is None else
                     "token states, " + ", ".join(f"{k} {v}" for k, v in value.items()))
        print(f"{key:22} {value}")
    return 0


def cmd_bench(argv: list[str]) -> int:
    """`loragen bench [options]` = `python -m benchmarks [options]`. The suite lives in the repository's
    benchmarks/ folder, which the installed package does not include (it is not library code, and a top-level
    `benchmarks` package would clash with others): it runs from a source checkout, as an editable install
    (`pip install -e .`, what scripts/install.sh does) is."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "suite.py").is_file():
        print(f"loragen: error: loragen bench runs the benchmark suite of a source checkout, and there is no "
              f"benchmarks/ folder next to {root / 'service'}; install loragen from a clone with "
              "`pip install -e .` (scripts/install.sh) and run it there", file=sys.stderr)
        return EXIT_USAGE
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.suite import main as bench_main

    return bench_main(argv)


def cmd_convert(args: argparse.Namespace) -> int:
    from generator.checkpoint import NATIVE_CONFIG, load_checkpoint

    ckpt = load_checkpoint(args.source, module_order=args.module_order, base_model=args.base_model)
    out = ckpt.save(args.out)
    what = "Doc-to-LoRA" if ckpt.kind == "d2l" else f"variant {ckpt.config.variant}"
    print(f"wrote {out / NATIVE_CONFIG} and weights: {what}, modules {ckpt.config.target_modules}, sha256 {ckpt.sha256}")
    return 0


def cmd_check_adapter(args: argparse.Namespace) -> int:
    """One line per problem on stdout and exit 2; or one `ok` line and exit 0."""
    from loragen.check import UnreadableAdapter, run_check

    try:
        result = run_check(args.path, args.consumer, args.max_lora_rank)
    except (UnreadableAdapter, ValueError) as e:
        raise _usage(str(e)) from None
    for problem in result.problems:
        print(f"{args.path}: {problem}")
    if result.problems:
        return EXIT_USAGE
    print(f"ok: {args.path} is fit for {args.consumer}: {result.summary}")
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    from pathlib import Path

    from generator.adapter import ADAPTER_WEIGHTS
    from generator.errors import InputError
    from generator.stack import stack_adapters

    files = []
    for path in map(Path, args.files):
        weights_file = path / ADAPTER_WEIGHTS if path.is_dir() else path
        try:
            files.append(weights_file.read_bytes())
        except FileNotFoundError:
            raise InputError(f"adapter {weights_file} not found") from None
        except OSError as e:
            raise InputError(f"cannot read adapter {weights_file}: {e.strerror}") from None
    adapter = stack_adapters(files, args.weights or [1.0] * len(files), dtype=args.dtype)
    out = Path(args.out)
    if out.suffix == ".safetensors":
        out.write_bytes(adapter.safetensors_bytes())
    else:
        adapter.save_pretrained(out)
    print(f"wrote {out} ({len(files)} adapters stacked: rank {adapter.provenance['rank']} in r {adapter.config['r']}, "
          f"{adapter.provenance['dtype']}, base {adapter.config['base_model_name_or_path']})")
    return 0


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1,0.5; got {text!r}") from None


def _train():
    from generator.train import commands

    return commands


def _read_text(path: str) -> str:
    from generator.errors import InputError

    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"document {path} not found") from None
    except UnicodeDecodeError:
        raise InputError(f"document {path} is not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"cannot read document {path}: {e.strerror}") from None


def _read_embedding(path: str):
    from safetensors.torch import load_file

    from generator.errors import InputError

    try:
        tensors = load_file(path)
    except FileNotFoundError:
        raise InputError(f"embedding file {path} not found") from None
    except Exception as e:  # safetensors' own errors for a file that is not safetensors
        raise InputError(f"embedding file {path} is not a readable safetensors file: {e}") from None
    if len(tensors) != 1:
        raise InputError(f"embedding file {path} must hold exactly one tensor, found {len(tensors)}")
    return next(iter(tensors.values()))


COMMANDS = {"serve": cmd_serve, "worker": cmd_worker, "generate": cmd_generate, "try": cmd_try, "inspect": cmd_inspect,
            "convert": cmd_convert, "check-adapter": cmd_check_adapter, "combine": cmd_combine,
            "train": lambda args: _train().cmd_train(args), "eval": lambda args: _train().cmd_eval(args)}

if __name__ == "__main__":
    sys.exit(main())
