"""The playground's logic (docs/playground.md): what an adapter changes, whether it is new, and what it does.

    stats    ||ΔW||_F per layer and module of a cached adapter, from r×r products: for ΔW = s·B A (A r×d_in,
             B d_out×r), ||ΔW||_F² = s² trace((BᵀB)(AAᵀ)); the d_out×d_in matrix is never formed
    novelty  the ΔW distance from a cached adapter to the adapters its checkpoint generates for its own training
             descriptions (computed once per checkpoint, on first use, and kept in memory), with the same trick:
             <B₁A₁, B₂A₂>_F = trace((B₁ᵀB₂)(A₂A₁ᵀ)), so ||ΔW₁ - ΔW₂||² needs r×r products only
    try      a cached adapter loaded with PEFT onto its checkpoint's base model, greedy answers with and without
             it, for a few short inputs

Nothing here runs torch on the event loop: stats run on a thread, novelty and try on threads of their own
(one each, so a model is only ever used by one thread). The routes (service/routes/playground.py) only parse
and call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import re
import statistics
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from generator.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_safetensors_metadata
from generator.errors import LoragenError
from generator.train.functional import lora_scaling
from service.adapters import AdapterService
from service.errors import ApiError, GenerationFailed, InvalidInput, Overloaded, Timeout, rate_limited
from service.settings import Settings

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"  # the page: index.html and its assets, no build step
# PEFT's key of a LoRA matrix in a Llama-family model: ...layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight
PEFT_KEY = re.compile(r"base_model\.model\.model\.layers\.(?P<layer>\d+)\.\w+\.(?P<module>\w+)\.lora_(?P<which>[AB])\.weight")
REFERENCE_BYTES = 512 << 20  # memory for the training adapters novelty keeps (their A and B, in float32)
REFERENCE_CHUNK = 64  # training adapters per step of a comparison (each step in float64)
REFERENCE_BATCH = 64  # descriptions per hypernetwork forward while those are computed
NEAREST = 5  # training descriptions the novelty answer lists
REPLICA, NEAR = 0.05, 0.5  # verdict thresholds on (nearest distance) / (typical distance between training tasks)
TRY_QUEUE = 8  # try requests queued or running; beyond: 429
LOADED_ADAPTERS = 4  # adapters kept loaded in a base's PeftModel (the oldest is dropped)
_BAD_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")  # control characters, lone surrogates
# transformers loads a model by patching process-wide state (weights first made on the meta device): two loads at
# once on two threads hand one of them meta tensors. The playground's threads load one model at a time
MODEL_LOADING = threading.Lock()


# ------------------------------------------------------------------------------------------------------------
# API models


class AdapterStats(BaseModel):
    id: str
    checkpoint: str | None = Field(description="the served checkpoint that generated it (null: none served here)")
    base_model: str
    dtype: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    scaling: float = Field(description="the factor PEFT applies: lora_alpha/sqrt(r) (rsLoRA) or lora_alpha/r")
    n_layers: int
    modules: list[str]
    norms: dict[str, list[float]] = Field(description="module → ||ΔW||_F of each layer, ΔW = scaling·B·A")
    total_norm: float = Field(description="||ΔW||_F over every layer and module together")
    size: int = Field(description="bytes of the safetensors file")


class Neighbour(BaseModel):
    task: str
    description: str
    distance: float = Field(description="||ΔW - ΔW_training||_F over every layer and module")


class Novelty(BaseModel):
    id: str
    available: bool
    reason: str | None = Field(None, description="why there is nothing to compare with (available: false)")
    checkpoint: str | None = None
    training_adapters: int = 0
    norm: float | None = Field(None, description="||ΔW||_F of this adapter")
    nearest: list[Neighbour] = Field(default_factory=list, description="the nearest training adapters, nearest first")
    typical_distance: float | None = Field(None, description="median distance from a training task's adapter to the "
                                                             "nearest adapter of another task")
    ratio: float | None = Field(None, description="nearest distance / typical_distance")
    verdict: Literal["replica", "near", "new"] | None = None


class TryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[0-9a-f]{64}$", description="a cached adapter's id")
    inputs: list[str] = Field(min_length=1, description="inputs for the base model, with and without the adapter")


class TryRow(BaseModel):
    input: str
    base: str
    adapted: str


class TryResponse(BaseModel):
    id: str
    checkpoint: str
    base_model: str
    rows: list[TryRow]


class TryInfo(BaseModel):
    available: bool
    reason: str | None = None
    examples: list[str] = Field(default_factory=list, description="inputs that fit the base model")


class NoveltyInfo(BaseModel):
    available: bool
    reason: str | None = None
    descriptions: int = 0


class PlaygroundCheckpoint(BaseModel):
    id: str
    default: bool
    base_model: str
    try_: TryInfo = Field(alias="try")
    novelty: NoveltyInfo
    suggestions: list[str] = Field(default_factory=list, description="task descriptions to start from")


class PlaygroundLimits(BaseModel):
    max_inputs: int
    max_input_chars: int
    max_text_chars: int


class PlaygroundInfo(BaseModel):
    checkpoints: list[PlaygroundCheckpoint]
    limits: PlaygroundLimits


# ------------------------------------------------------------------------------------------------------------
# the math: LoRA factors and r×r products


@dataclass(frozen=True)
class Factors:
    """One adapter's LoRA factors: per module, A (N, r, d_in) and B (N, d_out, r), float32."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    scaling: float
    config: dict
    provenance: dict


def read_factors(data: bytes) -> Factors:
    """The factors of a loragen safetensors file (read with safetensors: no pickle), ordered as its config's
    target_modules, layers 0..N-1."""
    from safetensors.torch import load

    meta = read_safetensors_metadata(data)
    config = json.loads(meta["adapter_config"])
    provenance = json.loads(meta.get("loragen", "{}"))
    found: dict[tuple[str, int, str], torch.Tensor] = {}
    for key, tensor in load(data).items():
        hit = PEFT_KEY.fullmatch(key)
        if hit:
            found[(hit["module"], int(hit["layer"]), hit["which"])] = tensor
    a, b = {}, {}
    for m in config["target_modules"]:
        n = 1 + max((i for mod, i, _ in found if mod == m), default=-1)
        if n:
            a[m] = torch.stack([found[(m, i, "A")] for i in range(n)]).float()  # (N, r, d_in)
            b[m] = torch.stack([found[(m, i, "B")] for i in range(n)]).float()  # (N, d_out, r)
    return Factors(a, b, lora_scaling(config), config, provenance)


def squared_norms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||B A||_F² per leading index, from r×r products: trace((BᵀB)(AAᵀ)). a (..., r, d_in), b (..., d_out, r)."""
    a, b = a.double(), b.double()
    bb = b.transpose(-1, -2) @ b  # (..., r, r)
    aa = a @ a.transpose(-1, -2)  # (..., r, r), symmetric: trace(bb·aa) = Σ bb ∘ aa
    return (bb * aa).sum((-1, -2)).clamp(min=0)


def inner_products(xa: torch.Tensor, xb: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """<B_x A_x, B_y A_y>_F summed over layers, for every pair of X adapters and Y adapters: (X, Y), in float64
    (a distance is a difference of such sums: float32 would round a copy's distance to well above zero).
    xa (X, N, r, d_in), xb (X, N, d_out, r); ya, yb likewise with Y. trace((B_xᵀB_y)(A_y A_xᵀ)), r×r each."""
    gb = torch.einsum("xnor,ynos->xynrs", xb.double(), yb.double())  # B_xᵀ B_y
    ga = torch.einsum("xnrd,ynsd->xynrs", xa.double(), ya.double())  # A_x A_yᵀ, the transpose of A_y A_xᵀ
    return (gb * ga).sum((2, 3, 4))


def layer_norms(f: Factors) -> dict[str, list[float]]:
    return {m: (f.scaling * squared_norms(f.a[m], f.b[m]).sqrt()).tolist() for m in f.a}


# ------------------------------------------------------------------------------------------------------------
# per checkpoint: what it can be tried on and compared with


@dataclass
class Target:
    """What the playground has for one served checkpoint."""

    cid: str
    base_model: str
    base: Path | None = None
    base_reason: str | None = None
    alphabet: str | None = None  # the characters a demo base model has tokens for; None: any text
    suite: Path | None = None
    suite_reason: str | None = None
    descriptions: list[tuple[str, str]] = field(default_factory=list)  # (task, training description)
    examples: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)


def _bundle(source: str) -> Path | None:
    """The bundle directory around a local checkpoint directory (its parent), or None for an hf:// source."""
    if source.startswith("hf://"):
        return None
    path = Path(source).expanduser()
    return path.resolve().parent if path.is_dir() else None


def find_target(cid: str, source: str, ckpt, settings: Settings) -> Target:
    """Where the checkpoint's base model and training descriptions are: the settings, else its bundle."""
    bundle = _bundle(source)
    target = Target(cid, ckpt.config.base_model)
    base = settings.playground_bases.get(cid)
    if base is None and bundle is not None and (bundle / "base" / "config.json").is_file():
        base = bundle / "base"
    if base is None:
        target.base_reason = (f"no base model for checkpoint {cid} here: set LORAGEN_PLAYGROUND_BASES='{cid}=DIR' "
                              "to a local copy of it")
    else:
        target.base_reason = _base_mismatch(base, ckpt.config)
        if target.base_reason is None:
            target.base = base
            target.alphabet = _alphabet(base)
    suite = settings.playground_suites.get(cid)
    if suite is None and bundle is not None and (bundle / "suite.json").is_file():
        suite = bundle / "suite.json"
    if suite is None:
        target.suite_reason = f"checkpoint {cid} ships no training descriptions to compare with"
    else:
        per_adapter = 4 * ckpt.config.n_layers * ckpt.config.r * sum(m.d_in + m.d_out for m in ckpt.config.modules)
        fit = min(settings.playground_references, max(1, REFERENCE_BYTES // per_adapter))
        _read_suite(target, suite, settings.try_max_inputs, fit)
    return target


def _base_mismatch(path: Path, config) -> str | None:
    """None if the base model at `path` has the layers and module shapes the checkpoint writes adapters for."""
    from transformers import AutoConfig

    from generator.config import modules_for_base

    try:
        base = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        specs = modules_for_base(base, [m.name for m in config.modules])
    except (OSError, ValueError, LoragenError, AttributeError) as e:
        return f"the base model for checkpoint {config.base_model} cannot be read: {' '.join(str(e).split())[:200]}"
    want = [(m.name, m.d_in, m.d_out) for m in config.modules]
    have = [(m.name, m.d_in, m.d_out) for m in specs]
    if base.num_hidden_layers != config.n_layers or want != have:
        return (f"the configured base model has {base.num_hidden_layers} layers of {have}, but the checkpoint writes "
                f"adapters for {config.n_layers} layers of {want}")
    return None


def _alphabet(base: Path) -> str | None:
    from generator.train.basemodel import CHARS, is_demo_base

    return (CHARS.replace("\n", "") + " ") if is_demo_base(base) else None


def _read_suite(target: Target, path: Path, max_examples: int, fit: int) -> None:
    """The training descriptions (at most `fit`), example inputs and suggestions of a suite."""
    from generator.train.suite import Suite

    try:
        suite = Suite.load(path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        target.suite_reason = f"the suite of checkpoint {target.cid} cannot be read: {' '.join(str(e).split())[:200]}"
        return
    target.suite = path
    # every seen task's first description, then every second one, ...: the first `fit` cover the tasks
    per_task = [[(t, d) for d in suite.train_descriptions.get(t, ())] for t in suite.seen]
    ordered = [pairs[i] for i in range(max(map(len, per_task), default=0)) for pairs in per_task if i < len(pairs)]
    target.descriptions = ordered[:fit]
    if not target.descriptions:
        target.suite, target.suite_reason = None, f"the suite of checkpoint {target.cid} has no training descriptions"
    # inputs for try-it: the first evaluation input of each task that is a plain word, as the demo's tasks take
    words = [xs[0][0] for xs in suite.eval_examples.values() if xs and xs[0][0].isalpha()]
    target.examples = list(dict.fromkeys(words))[: min(6, max_examples)]
    # descriptions no hypernetwork trained on: the evaluation phrasing of seen tasks, spread over them
    phrased = [t for t in suite.seen if suite.eval_descriptions.get(t)]
    target.suggestions = [suite.eval_descriptions[t][0] for t in phrased[::max(1, len(phrased) // 8)]][:8]


# ------------------------------------------------------------------------------------------------------------
# novelty: the training adapters of a checkpoint


@dataclass(frozen=True)
class References:
    """The adapters a checkpoint generates for its training descriptions, as factors, with the scale of
    distances between training tasks."""

    tasks: list[str]
    descriptions: list[str]
    a: dict[str, torch.Tensor]  # module → (K, N, r, d_in)
    b: dict[str, torch.Tensor]  # module → (K, N, d_out, r)
    sq_norms: torch.Tensor  # (K,) ||B A||² summed over layers and modules (unscaled)
    typical: float | None  # scaled, like every distance reported

    def distances(self, xa: dict[str, torch.Tensor], xb: dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
        """(X, K) ΔW distances from X adapters (factors (X, N, ...)) to every reference."""
        k = len(self.tasks)
        inner = torch.cat([sum(inner_products(xa[m], xb[m], self.a[m][i:i + REFERENCE_CHUNK], self.b[m][i:i + REFERENCE_CHUNK])
                               for m in self.a) for i in range(0, k, REFERENCE_CHUNK)], dim=1)
        x_sq = sum(squared_norms(xa[m], xb[m]).sum(-1) for m in self.a)  # (X,)
        sq = x_sq[:, None] + self.sq_norms[None, :] - 2 * inner
        return scaling * sq.clamp(min=0).sqrt()


def build_references(ckpt, descriptions: Sequence[tuple[str, str]], device: str, trust_remote_code: bool,
                     scaling: float) -> References:
    """Generate the adapter of every training description (float32, batched: the result differs from the exact
    mode by rounding only) and measure how far training tasks lie from one another."""
    from generator.pipeline import LoraGenerator, TaskInput

    with MODEL_LOADING:
        gen = LoraGenerator(ckpt, device=device, compute_dtype=torch.float32, trust_remote_code=trust_remote_code)
        _ = gen.encoder
    parts: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    with torch.inference_mode():
        for i in range(0, len(descriptions), REFERENCE_BATCH):
            ab = gen.hypernet([TaskInput.task(d) for _, d in descriptions[i:i + REFERENCE_BATCH]])
            for m, (a, b) in ab.items():  # (B, N, r, d_in), (B, N, d_out, r)
                parts.setdefault(m, ([], []))
                parts[m][0].append(a.float().cpu())
                parts[m][1].append(b.float().cpu())
    del gen  # the encoder and hypernetwork copy go; the factors stay
    a = {m: torch.cat(pa) for m, (pa, _) in parts.items()}
    b = {m: torch.cat(pb) for m, (_, pb) in parts.items()}
    sq = sum(squared_norms(a[m], b[m]).sum(-1) for m in a)
    tasks = [t for t, _ in descriptions]
    refs = References(tasks, [d for _, d in descriptions], a, b, sq, None)
    # the scale: per task, the distance from its first description's adapter to the nearest adapter of another
    # task; the median over tasks
    firsts = list({t: i for i, t in reversed(list(enumerate(tasks)))}.values())
    if len(firsts) < 2:
        return refs
    nearest = []
    for j in range(0, len(firsts), 8):  # a few rows at a time: (8, K, N, r, r) at most
        rows = firsts[j:j + 8]
        d = refs.distances({m: a[m][rows] for m in a}, {m: b[m][rows] for m in b}, scaling)
        for row, i in zip(d, rows, strict=True):
            other = torch.tensor([t != tasks[i] for t in tasks])
            nearest.append(float(row[other].min()))
    return References(refs.tasks, refs.descriptions, a, b, sq, statistics.median(nearest))


def compare(adapter_id: str, cid: str, f: Factors, refs: References) -> Novelty:
    """How far the adapter `f` lies from the training adapters `refs` of its checkpoint `cid`."""
    d = refs.distances({m: t[None] for m, t in f.a.items()}, {m: t[None] for m, t in f.b.items()}, f.scaling)[0]
    order = d.argsort()[:NEAREST].tolist()
    nearest = [Neighbour(task=refs.tasks[k], description=refs.descriptions[k], distance=float(d[k])) for k in order]
    norm = f.scaling * float(sum(squared_norms(f.a[m], f.b[m]).sum() for m in f.a)) ** 0.5
    ratio = verdict = None
    if refs.typical:
        ratio = nearest[0].distance / refs.typical
        verdict = "replica" if ratio < REPLICA else "near" if ratio < NEAR else "new"
    return Novelty(id=adapter_id, available=True, checkpoint=cid, training_adapters=len(refs.tasks), norm=norm,
                   nearest=nearest, typical_distance=refs.typical, ratio=ratio, verdict=verdict)


# ------------------------------------------------------------------------------------------------------------
# try: a base model and the adapters loaded onto it


class TriedBase:
    """A base model and its PeftModel, used by the try thread only, on the CPU. Loaded on first use."""

    def __init__(self, path: Path):
        self.path = path
        self.model = self.fmt = self.peft = None
        self.loaded: OrderedDict[str, None] = OrderedDict()  # adapter names in the PeftModel, oldest first

    def run(self, adapter_id: str, data: bytes, inputs: list[str], max_new: int) -> tuple[list[str], list[str]]:
        """(the base model's answers, the adapted model's answers)."""
        from generator.train.prompting import answers

        if self.model is None:
            from generator.train.basemodel import load_base

            with MODEL_LOADING:
                model, self.fmt = load_base(self.path)
            self.model = model
        name = "a" + adapter_id[:32]
        if name not in self.loaded:
            self._load(name, data)
        self.loaded.move_to_end(name)
        self.peft.set_adapter(name)
        with torch.inference_mode():
            adapted = answers(self.peft, self.fmt, inputs, max_new=max_new)
            with self.peft.disable_adapter():
                base = answers(self.peft, self.fmt, inputs, max_new=max_new)
        while len(self.loaded) > LOADED_ADAPTERS:
            oldest, _ = self.loaded.popitem(last=False)
            self.peft.delete_adapter(oldest)
        return base, adapted

    def _load(self, name: str, data: bytes) -> None:
        from peft import PeftModel

        config = read_safetensors_metadata(data)["adapter_config"]
        with tempfile.TemporaryDirectory(prefix="loragen-try-") as tmp:
            (Path(tmp) / ADAPTER_WEIGHTS).write_bytes(data)
            (Path(tmp) / ADAPTER_CONFIG).write_text(config, encoding="utf-8")
            try:
                with MODEL_LOADING, torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, raised inside PEFT
                    if self.peft is None:
                        self.peft = PeftModel.from_pretrained(self.model, tmp, adapter_name=name).eval()
                    else:
                        self.peft.load_adapter(tmp, adapter_name=name)
            except (RuntimeError, ValueError, KeyError) as e:
                raise InvalidInput(f"the adapter does not fit the base model: {' '.join(str(e).split())[:300]}") from None
        self.loaded[name] = None


def check_inputs(inputs: list[str], *, max_inputs: int, max_chars: int, alphabet: str | None) -> list[str]:
    """The inputs of a try request, or InvalidInput saying what is wrong with the first bad one."""
    if len(inputs) > max_inputs:
        raise InvalidInput(f"{len(inputs)} inputs; the limit is {max_inputs}")
    for k, x in enumerate(inputs):
        if not x.strip():
            raise InvalidInput(f"inputs.{k} is empty")
        if len(x) > max_chars:
            raise InvalidInput(f"inputs.{k} has {len(x)} characters; the limit is {max_chars}")
        if (bad := _BAD_TEXT.search(x)) is not None:
            raise InvalidInput(f"inputs.{k} holds a control character or lone surrogate at position {bad.start()}")
        if alphabet is not None and (missing := sorted({c for c in x if c not in alphabet})):
            raise InvalidInput(f"inputs.{k}: the base model has no token for {''.join(missing)!r}; it reads letters, "
                               "digits and punctuation, e.g. 'jcdg' or '3 1 2'")
    return inputs


# ------------------------------------------------------------------------------------------------------------
# the service object


class Playground:
    """On `app.state.playground`: made in the lifespan, once the checkpoints are loaded."""

    def __init__(self, settings: Settings, service: AdapterService, device: str = "cpu"):
        """`device`: where novelty generates the training adapters (the first generation device); the base
        models of try-it run on the CPU."""
        self.settings, self.service, self.device = settings, service, device
        self.targets = {cid: find_target(cid, settings.checkpoints.get(cid, ""), ckpt, settings)
                        for cid, ckpt in service.checkpoints.items()}
        self.by_sha = {}
        for cid, ckpt in service.checkpoints.items():
            self.by_sha.setdefault(ckpt.sha256, cid)
        self._try_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loragen-try")
        self._novelty_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loragen-novelty")
        self._bases: dict[str, TriedBase] = {}
        self._try_pending = 0
        self._references: dict[str, asyncio.Future[References]] = {}
        self.by_key = bool(settings.api_key_hashes())  # a rate limit counts per key, else per client address
        self.limiter = None
        limit = settings.try_rate_limit()
        if limit is not None:
            from service.ratelimit import RateLimiter

            self.limiter = RateLimiter(*limit, redis_url=settings.queue_url(), prefix=settings.cache_prefix + "try:",
                                       socket_timeout_s=settings.redis_timeout_s)

    async def close(self) -> None:
        for pool in (self._try_thread, self._novelty_thread):
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        if self.limiter is not None:
            await self.limiter.close()

    # ---- what the page needs to know ----

    def info(self) -> PlaygroundInfo:
        s = self.settings
        return PlaygroundInfo(
            checkpoints=[PlaygroundCheckpoint(
                id=cid, default=cid == self.service.default, base_model=t.base_model,
                suggestions=t.suggestions,
                **{"try": TryInfo(available=t.base is not None, reason=t.base_reason, examples=t.examples)},
                novelty=NoveltyInfo(available=t.suite is not None, reason=t.suite_reason, descriptions=len(t.descriptions)),
            ) for cid, t in self.targets.items()],
            limits=PlaygroundLimits(max_inputs=s.try_max_inputs, max_input_chars=s.try_max_input_chars,
                                    max_text_chars=s.max_text_chars))

    def checkpoint_of(self, factors: Factors) -> str | None:
        return self.by_sha.get(factors.provenance.get("checkpoint_sha256", ""))

    # ---- stats ----

    async def stats(self, adapter_id: str) -> AdapterStats:
        data = await self.service.get(adapter_id)  # 404 when not cached
        return await asyncio.to_thread(self._stats_of, adapter_id, data)

    def _stats_of(self, adapter_id: str, data: bytes) -> AdapterStats:
        f = read_factors(data)
        norms = layer_norms(f)
        total = sum(v * v for vs in norms.values() for v in vs) ** 0.5
        c = f.config
        return AdapterStats(
            id=adapter_id, checkpoint=self.checkpoint_of(f), base_model=str(c.get("base_model_name_or_path")),
            dtype=f.provenance.get("dtype", "unknown"), rank=int(c["r"]), lora_alpha=float(c["lora_alpha"]),
            use_rslora=bool(c.get("use_rslora")), scaling=f.scaling, n_layers=max(map(len, norms.values()), default=0),
            modules=list(norms), norms=norms, total_norm=total, size=len(data))

    # ---- novelty ----

    async def novelty(self, adapter_id: str) -> Novelty:
        data = await self.service.get(adapter_id)
        f = await asyncio.to_thread(read_factors, data)
        cid = self.checkpoint_of(f)
        if cid is None:
            return Novelty(id=adapter_id, available=False,
                           reason="the adapter's checkpoint is not served here, so there is nothing to compare with")
        target = self.targets[cid]
        if target.suite is None:
            return Novelty(id=adapter_id, available=False, checkpoint=cid, reason=target.suite_reason)
        refs = await self._references_of(target, f.scaling)
        return await asyncio.get_running_loop().run_in_executor(self._novelty_thread, compare, adapter_id, cid, f, refs)

    async def _references_of(self, target: Target, scaling: float) -> References:
        """The checkpoint's training adapters: computed on the novelty thread once (concurrent callers share the
        computation), then kept. A failure is not kept: the next request tries again."""
        future = self._references.get(target.cid)
        if future is None:
            ckpt = self.service.checkpoints[target.cid]
            log.info("novelty: generating the adapters of %d training descriptions of checkpoint %s",
                     len(target.descriptions), target.cid)
            future = asyncio.get_running_loop().run_in_executor(self._novelty_thread, functools.partial(
                build_references, ckpt, target.descriptions, self.device, self.settings.trust_remote_code, scaling))
            self._references[target.cid] = future
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.settings.request_timeout_s)
        except TimeoutError:
            raise Timeout(f"computing the training adapters of checkpoint {target.cid} takes longer than "
                          f"{self.settings.request_timeout_s:g} s; it goes on: retry later") from None
        except LoragenError as e:
            self._references.pop(target.cid, None)
            raise GenerationFailed(f"the training adapters of checkpoint {target.cid} could not be generated: {e}") from None
        except Exception:
            self._references.pop(target.cid, None)
            log.exception("novelty: generating the training adapters of checkpoint %s failed", target.cid)
            raise GenerationFailed("generating the training adapters failed; retry") from None

    # ---- try ----

    async def try_adapter(self, body: TryRequest, client: str) -> TryResponse:
        if self.limiter is not None:
            wait_s = await self.limiter.take(client)
            if wait_s > 0:
                raise rate_limited("try-it is limited", self.limiter.rate, self.limiter.burst, wait_s)
        data = await self.service.get(body.id)
        provenance = json.loads(read_safetensors_metadata(data).get("loragen", "{}"))
        cid = self.by_sha.get(provenance.get("checkpoint_sha256", ""))
        if cid is None:
            raise InvalidInput(f"adapter {body.id} was generated by a checkpoint this server does not serve")
        target = self.targets[cid]
        if target.base is None:
            raise InvalidInput(f"adapters of checkpoint {cid} cannot be tried here: {target.base_reason}")
        s = self.settings
        inputs = check_inputs(body.inputs, max_inputs=s.try_max_inputs, max_chars=s.try_max_input_chars,
                              alphabet=target.alphabet)
        if self._try_pending >= TRY_QUEUE:
            raise Overloaded(f"{self._try_pending} try requests are waiting; retry shortly", headers={"Retry-After": "1"})
        base = self._bases.setdefault(cid, TriedBase(target.base))
        self._try_pending += 1
        future = asyncio.get_running_loop().run_in_executor(
            self._try_thread, base.run, body.id, data, inputs, s.try_max_new_tokens)
        future.add_done_callback(self._try_done)
        try:
            before, after = await asyncio.wait_for(asyncio.shield(future), s.request_timeout_s)
        except TimeoutError:
            raise Timeout(f"trying the adapter took longer than {s.request_timeout_s:g} s") from None
        except ApiError:
            raise
        except LoragenError as e:  # the base model cannot be loaded as configured
            raise InvalidInput(f"the base model of checkpoint {cid} cannot be used: {e}") from None
        except Exception:
            log.exception("try: running adapter %s on the base model of %s failed", body.id, cid)
            raise GenerationFailed("running the base model failed; retry") from None
        rows = [TryRow(input=x, base=b, adapted=a) for x, b, a in zip(inputs, before, after, strict=True)]
        return TryResponse(id=body.id, checkpoint=cid, base_model=target.base_model, rows=rows)

    def _try_done(self, future: asyncio.Future) -> None:
        self._try_pending -= 1
        if not future.cancelled():
            future.exception()  # retrieved here too: a waiter that timed out never reads it
