"""Hypernetwork checkpoints: the native format, import of released T2L directories, and sources.

Native format (a directory):
    config.json        HyperConfig.to_json(): format version, variant, dims, ordered modules, LoRA and
                       encoder settings, base model id and revision, and (a reader checkpoint only) the
                       token reader's settings under "reader"
    model.safetensors  the state dict, float32; loading it never unpickles anything

Released T2L format (SakanaAI/text-to-lora, `trained_t2l/<name>/`):
    hypermod.pt        torch pickle of a state dict: read with `weights_only=True` only
    args.yaml          training arguments: variant flags, latent sizes, encoder and base model ids
    adapter_config.json  PEFT config: r, lora_alpha, use_rslora and the module order (see `import_t2l`)
Dims are read from the tensors, so the base LLM is never needed.

Released Doc-to-LoRA format (SakanaAI/doc-to-lora, `<name>/`): `args.yaml` and
`checkpoint-<step>/pytorch_model.bin`, read by generator/d2l/released.py with allow-listed unpickling. Its
native form is the same pair of files as a T2L checkpoint's, with `"kind": "d2l"` in config.json.

Sources: a local directory, or `hf://owner/repo[/subfolder][@revision]` fetched with huggingface_hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from generator.config import T2L_ENCODER, EncoderSpec, HyperConfig, ModuleSpec
from generator.d2l.config import KIND as D2L_KIND
from generator.d2l.config import D2LConfig
from generator.d2l.hypernet import D2LHypernet
from generator.d2l.released import import_d2l, is_d2l_source
from generator.errors import CheckpointError, ConfigError
from generator.hypernet import HyperLoRA, build_hypernet

log = logging.getLogger(__name__)

NATIVE_CONFIG = "config.json"
NATIVE_WEIGHTS = "model.safetensors"
T2L_FILES = ("hypermod.pt", "args.yaml", "adapter_config.json")
# Reconstruction-training statistics carried by every released T2L state dict; unused by generation.
T2L_IGNORED_PREFIXES = ("mean_recon_target.", "std_recon_target.")
HF_SCHEME = "hf://"
_HF_URI = re.compile(
    r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<sub>(/[\w.-]+)*)/?(@(?P<rev>[\w./-]+))?$"
)

# Encoders whose preprocessing T2L fixed: what their `emb_model` in args.yaml implies.
KNOWN_ENCODERS = {
    T2L_ENCODER: dict(dim=1024, pooling="cls", normalization="l2_sqrt_dim", append_full_stop=True,
                      max_length=8192, requires_remote_code=True),
}


AnyConfig = HyperConfig | D2LConfig


def kind_of(config: AnyConfig) -> str:
    """'t2l' (a Text-to-LoRA config) or 'd2l' (Doc-to-LoRA)."""
    return D2L_KIND if isinstance(config, D2LConfig) else "t2l"


def build_network(config: AnyConfig) -> HyperLoRA | D2LHypernet:
    """The untrained network `config` describes, of its kind."""
    return D2LHypernet(config) if isinstance(config, D2LConfig) else build_hypernet(config)


@dataclass(frozen=True)
class Checkpoint:
    """A validated hypernetwork of either kind: its config, its float32 state dict and a content hash."""

    config: AnyConfig
    state_dict: Mapping[str, torch.Tensor]
    sha256: str  # content hash of config + tensors: the identity of everything it generates
    source: str = ""

    @classmethod
    def from_state_dict(cls, config: AnyConfig, state_dict: Mapping[str, torch.Tensor], source: str = "") -> Checkpoint:
        """Validate `state_dict` against `config` (exact keys and shapes) and hash it."""
        check_state_dict(config, state_dict)
        # a fresh copy of each tensor: owned, contiguous and 64-byte aligned (safetensors' tensors sit at
        # arbitrary offsets, and BLAS kernels, so float32 rounding, depend on alignment)
        sd = {k: v.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)
              for k, v in state_dict.items()}
        return cls(config, sd, content_hash(config, sd), source)

    @classmethod
    def from_module(cls, net: HyperLoRA, source: str = "") -> Checkpoint:
        return cls.from_state_dict(net.config, net.state_dict(), source)

    @property
    def kind(self) -> str:
        return kind_of(self.config)

    def build(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> HyperLoRA | D2LHypernet:
        """The hypernetwork in eval mode on `device`, computing in `dtype`."""
        with torch.device("meta"):
            net = build_network(self.config)
        net.load_state_dict(self.state_dict, strict=True, assign=True)
        if isinstance(net, HyperLoRA):
            net.reset_buffers()
        return net.to(device=device, dtype=dtype).eval()

    @property
    def n_params(self) -> int:
        """Parameters that generation uses (offsets included)."""
        return sum(t.numel() for t in self.state_dict.values())

    def describe(self) -> dict:
        """Kind, base model, variant, modules, dims, rank and size: for `loragen inspect` and GET /v1/checkpoints."""
        c = self.config
        if isinstance(c, D2LConfig):
            return self._describe_d2l(c)
        return {
            "kind": "t2l",
            "base_model": c.base_model,
            "base_model_revision": c.base_model_revision,
            "variant": c.variant,
            "modules": {m.name: {"d_in": m.d_in, "d_out": m.d_out} for m in c.modules},
            "n_layers": c.n_layers,
            "rank": c.r,
            "lora_alpha": c.lora_alpha,
            "use_rslora": c.use_rslora,
            "scaling": round(c.scaling, 6),
            "latent": c.latent,
            "head_in": c.head_in,
            "task_emb_dim": c.task_emb_dim,
            "encoder": c.encoder.name,
            "encoder_pooling": c.encoder.pooling,
            "encoder_normalization": c.encoder.normalization,
            # null: one pooled embedding per text; else the token reader's settings (latents, width, heads, ...)
            "reader": None if c.reader is None else asdict(c.reader),
            "parameters": self.n_params,
            "sha256": self.sha256,
        }

    def _describe_d2l(self, c: D2LConfig) -> dict:
        return {
            "kind": D2L_KIND,
            "base_model": c.base_model,
            "base_model_revision": c.base_model_revision,
            "modules": {m.name: {"d_in": m.d_in, "d_out": m.d_out} for m in c.modules},
            "n_layers": c.n_layers,
            "base_hidden_size": c.hidden,
            "rank": c.r,  # per chunk: a document of n chunks gets (n + 1) * rank with the bias LoRA
            "lora_alpha": c.lora_alpha,  # applied as is, not divided by the rank (see docs/documents.md)
            "bias_lora": c.use_bias,
            "latent": c.latent,
            "perceiver": asdict(c.perceiver),
            "pre_head_layers": c.pre_head_layers,
            "chunk_tokens": c.chunk_tokens or None,  # None: a document is one chunk unless a request says otherwise
            "trained_on_quantized_base": c.trained_on_quantized_base,
            "parameters": self.n_params,
            "sha256": self.sha256,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write the native format; the directory is created, existing files are replaced."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(dict(self.state_dict), str(out / NATIVE_WEIGHTS), metadata={"format": "pt"})
        (out / NATIVE_CONFIG).write_text(self.config.to_json())
        return out


def expected_shapes(config: AnyConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key the architecture has, with its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        net = build_network(config)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def check_state_dict(config: AnyConfig, state_dict: Mapping[str, object]) -> None:
    """Strict: the exact key set, every value a floating tensor of the expected shape; errors name keys."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(want))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        what = (f"a Doc-to-LoRA hypernetwork ({config.pre_head_layers} pre-head layers, {config.perceiver.blocks} "
                f"Perceiver blocks)" if isinstance(config, D2LConfig) else
                f"a {config.variant} hypernetwork{' with a token reader (config.json has reader)' if config.reader else ''}")
        raise CheckpointError(f"state dict does not match {what} for modules {config.target_modules}: {'; '.join(parts)}")
    for k, shape in want.items():
        v = state_dict[k]
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise CheckpointError(f"state dict entry {k!r} must be a floating-point tensor, got {type(v).__name__}")
        if tuple(v.shape) != shape:
            raise CheckpointError(f"state dict entry {k!r} has shape {list(v.shape)}, expected {list(shape)}")
        if not torch.isfinite(v).all():
            raise CheckpointError(f"state dict entry {k!r} holds NaN or infinite values")


def content_hash(config: AnyConfig, state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the canonical config JSON and every tensor (sorted keys; name, dtype, shape, bytes)."""
    h = hashlib.sha256(config.canonical_json().encode())
    for k in sorted(state_dict):
        t = state_dict[k].contiguous()
        h.update(f"\n{k}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_checkpoint(
    source: str | Path,
    *,
    module_order: Sequence[str] | None = None,
    base_model: str | None = None,
    cache_dir: str | Path | None = None,
    hf_allow: Sequence[str] | None = None,
) -> Checkpoint:
    """Load a native or released-T2L checkpoint from a local directory or an `hf://` source.

    `module_order` (T2L only) overrides the module index order read from adapter_config.json, for a
    checkpoint whose training order is known to differ. `base_model` overrides the base model id.
    `hf_allow` (non-empty) limits `hf://` sources to those owners ('owner') or repos ('owner/repo').
    """
    src = str(source)
    path = resolve_source(src, cache_dir=cache_dir, hf_allow=hf_allow)
    if (path / NATIVE_CONFIG).is_file() and (path / NATIVE_WEIGHTS).is_file():
        if module_order is not None:
            raise CheckpointError("--module-order applies to released T2L checkpoints; a native checkpoint stores its order")
        ckpt = load_native(path, source=src)
    elif all((path / f).is_file() for f in T2L_FILES):
        ckpt = import_t2l(path, module_order=module_order, source=src)
    elif is_d2l_source(path):
        if module_order is not None:
            raise CheckpointError("--module-order applies to released T2L checkpoints; Doc-to-LoRA sorts its modules by name")
        config, sd = import_d2l(path)
        ckpt = Checkpoint.from_state_dict(config, sd, src)
    else:
        raise CheckpointError(
            f"{src} is not a checkpoint: expected {NATIVE_CONFIG} + {NATIVE_WEIGHTS} (native), "
            f"{' + '.join(T2L_FILES)} (released T2L) or [checkpoint-<step>/]pytorch_model.bin (released Doc-to-LoRA)"
        )
    if base_model:
        config = replace(ckpt.config, base_model=base_model)
        ckpt = Checkpoint(config, ckpt.state_dict, content_hash(config, ckpt.state_dict), src)
    return ckpt


def resolve_source(source: str, *, cache_dir: str | Path | None = None, hf_allow: Sequence[str] | None = None) -> Path:
    """A local directory as is; `hf://owner/repo[/subfolder][@revision]` downloaded (or found in the HF cache),
    if `hf_allow` is empty or lets its repo through (checked before anything is fetched)."""
    if source.startswith(HF_SCHEME):
        repo, sub, rev = parse_hf_uri(source)
        check_hf_allowed(repo, hf_allow)
        from huggingface_hub import snapshot_download

        try:
            root = snapshot_download(repo, revision=rev, cache_dir=cache_dir,
                                     allow_patterns=[f"{sub}/*"] if sub else None)
        except Exception as e:  # network, auth, missing repo or revision: one line for the operator
            raise CheckpointError(f"cannot fetch {source}: {type(e).__name__}: {_first_line(e)}") from None
        path = Path(root) / sub if sub else Path(root)
    else:
        path = Path(source).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {source} not found: expected a directory or hf://owner/repo[/subfolder][@revision]")
    return path


def check_hf_allowed(repo: str, hf_allow: Sequence[str] | None) -> None:
    """CheckpointError unless `hf_allow` is empty or holds `repo`'s owner or `repo` itself (case-insensitive,
    as the hub treats repo ids)."""
    if not hf_allow:
        return
    owner = repo.split("/", 1)[0].lower()
    if not any(p.lower() in (owner, repo.lower()) for p in hf_allow):
        raise CheckpointError(f"hf://{repo} is not allowed here: hf:// sources are limited to {', '.join(hf_allow)} "
                              "(LORAGEN_HF_ALLOW); add its owner or owner/repo there, or serve a local directory")


def parse_hf_uri(uri: str) -> tuple[str, str, str | None]:
    """`hf://owner/repo[/subfolder][@revision]` → (repo id, subfolder or "", revision or None)."""
    m = _HF_URI.match(uri)
    if not m or ".." in uri:
        raise CheckpointError(f"malformed source {uri!r}: expected hf://owner/repo[/subfolder][@revision]")
    return m["repo"], m["sub"].strip("/"), m["rev"]


# ---------------------------------------------------------------------------------------------- native

def load_native(path: Path, source: str = "") -> Checkpoint:
    try:
        raw = json.loads((path / NATIVE_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / NATIVE_CONFIG}: {_first_line(e)}") from None
    try:
        config = D2LConfig.from_dict(raw) if isinstance(raw, dict) and raw.get("kind") == D2L_KIND else HyperConfig.from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"invalid {path / NATIVE_CONFIG}: {e}") from None
    try:
        sd = load_file(str(path / NATIVE_WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for truncated or malformed files
        raise CheckpointError(f"cannot read {path / NATIVE_WEIGHTS} (corrupt or truncated?): {_first_line(e)}") from None
    return Checkpoint.from_state_dict(config, sd, source or str(path))


# ------------------------------------------------------------------------------------ released T2L

def import_t2l(path: Path, *, module_order: Sequence[str] | None = None, source: str = "") -> Checkpoint:
    """Import a released T2L directory without the base model.

    Module index order: the position in adapter_config.json's `target_modules`. The reference derives it
    from a Python set (so from the process's hash seed); that list is the best record of the training
    order, and ours never depends on the process. `module_order` overrides it when the training order
    is known to differ.
    """
    args = _read_yaml(path / "args.yaml")
    peft_cfg = _read_json(path / "adapter_config.json")
    sd = _read_torch_state_dict(path / "hypermod.pt")

    variant = _t2l_variant(args)
    if peft_cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"adapter_config.json has peft_type {peft_cfg.get('peft_type')!r}; T2L checkpoints use LORA")
    targets = peft_cfg.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise CheckpointError("adapter_config.json must list target_modules as a JSON list of names")
    order = list(targets)
    if module_order is not None:
        if sorted(module_order) != sorted(targets) or len(set(module_order)) != len(module_order):
            raise CheckpointError(f"module order {list(module_order)} must be a permutation of {targets}")
        order = list(module_order)

    def dims(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise CheckpointError(f"hypermod.pt is missing key {key!r}, needed to infer the architecture")
        return tuple(sd[key].shape)

    r = peft_cfg.get("r")
    d_half, e = dims("task_encoder.mlp.0.weight")
    modules = []
    for name in order:
        n, r_a, d_in = dims(f"AB_offset.A.{name}")
        _, d_out, r_b = dims(f"AB_offset.B.{name}")
        if r_a != r or r_b != r:
            raise CheckpointError(f"offsets of {name} have rank {r_a}/{r_b} but adapter_config.json says r={r}")
        modules.append(ModuleSpec(name, d_in, d_out))
    emb_model = args.get("emb_model") or T2L_ENCODER
    enc = KNOWN_ENCODERS.get(emb_model, dict(dim=e))
    base = peft_cfg.get("base_model_name_or_path") or args.get("model_dir") or ""
    if base.startswith(("/", ".", "~")):  # a local path on the training host is not an id
        base = args.get("model_dir", "")
    try:
        config = HyperConfig(
            variant=variant,
            task_emb_dim=e,
            latent=2 * d_half,
            head_in=dims("mlp3.4.weight")[0],
            n_layers=dims("layer_depth_encoder.0.weight")[0],
            modules=tuple(modules),
            r=r,
            lora_alpha=float(peft_cfg.get("lora_alpha", 16)),
            use_rslora=bool(peft_cfg.get("use_rslora", False)),
            encoder=EncoderSpec(name=emb_model, **enc),
            base_model=base,
            base_model_revision=peft_cfg.get("revision"),
        )
    except ConfigError as e:
        raise CheckpointError(f"{path} does not describe a valid hypernetwork: {e}") from None
    if args.get("hypernet_latent_size") not in (None, config.latent):
        raise CheckpointError(f"args.yaml says hypernet_latent_size {args['hypernet_latent_size']}, tensors say {config.latent}")
    want = expected_shapes(config)
    for k in [k for k in sd if k.startswith(T2L_IGNORED_PREFIXES)]:
        stat = sd.pop(k)
        offset = "AB_offset." + k.split(".", 1)[1]
        if offset not in want or tuple(stat.shape) != want[offset]:
            raise CheckpointError(f"unexpected key {k!r} with shape {list(stat.shape)}")
    return Checkpoint.from_state_dict(config, sd, source or str(path))


def _t2l_variant(args: dict) -> str:
    for flag, ok in (("learnable_pos_emb", False), ("encoder_type", "linear"), ("training_task", "sft")):
        if args.get(flag, ok) != ok:
            raise CheckpointError(f"args.yaml has {flag}: {args[flag]!r}; only {flag}: {ok!r} T2L checkpoints are supported")
    if args.get("mt_lora_path"):
        raise CheckpointError("args.yaml has mt_lora_path set: checkpoints built on a multi-task LoRA are not supported")
    shared, autoreg = bool(args.get("shared_AB_head", False)), bool(args.get("autoreg_gen", False))
    if autoreg and not shared:
        raise CheckpointError("args.yaml has autoreg_gen without shared_AB_head: no such T2L variant")
    return "S" if autoreg else "M" if shared else "L"


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())  # safe_load: no Python objects from YAML tags
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"cannot read {path}: {_first_line(e)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must be a YAML mapping of training arguments")
    return data


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {_first_line(e)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must be a JSON object")
    return data


def _read_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only=True: the restricted unpickler builds tensors and plain containers, never code
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, hostile pickle, wrong format: all refused the same way
        raise CheckpointError(
            f"refusing {path}: not a plain tensor state dict loadable with weights_only=True "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a state dict of tensors")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{path} holds non-tensor entries {_few(bad)}; expected only tensors")
    return dict(obj)


def _few(keys: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{f', ... ({len(keys) - n} more)' if len(keys) > n else ''}]"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
