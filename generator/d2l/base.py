"""The base model a Doc-to-LoRA checkpoint reads with and writes adapters for: loading it with its tokenizer,
checking that it is the base the checkpoint was trained on, and its identity (a content hash).

The checkpoint names its base by `base_model_name_or_path` (a hub id, or a directory on the training host);
`base_dir` overrides that with a local directory. Loading never runs code shipped with the model unless the
operator opts in (`trust_remote_code`).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from generator.config import modules_for_base
from generator.d2l.config import D2LConfig
from generator.errors import CheckpointError

# files that decide what the base computes from a text: its architecture, its weights and its tokenizer
_IDENTITY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_READ = 8 << 20


@dataclass
class BaseModel:
    """A loaded base: the causal LM (eval mode, frozen), its tokenizer, where it came from and its sha256."""

    model: torch.nn.Module
    tokenizer: object
    path: Path
    sha256: str

    @property
    def n_bytes(self) -> int:
        """Memory its parameters and buffers take."""
        return sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))


def resolve_base_dir(config: D2LConfig, base_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local directory of the checkpoint's base: `base_dir`, else its name as a directory, else from the hub."""
    if base_dir is not None:
        path = Path(base_dir).expanduser()
        if not (path / "config.json").is_file():
            raise CheckpointError(f"--base-dir {base_dir}: no config.json there; give the directory the base model was "
                                  "saved to (save_pretrained)")
        return path
    local = Path(config.base_model).expanduser()
    if (local / "config.json").is_file():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(config.base_model, revision=config.base_model_revision, cache_dir=cache_dir))
    except Exception as e:  # offline, gated, missing: one line that names the remedy
        raise CheckpointError(f"the checkpoint's base model {config.base_model!r} cannot be found locally or fetched "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                              "give its directory with --base-dir (LORAGEN_BASE_DIRS)") from None


@functools.cache
def base_identity(path: Path) -> str:
    """sha256 over the base's config, tokenizer and weight files (names and bytes, in name order)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.name in _IDENTITY_FILES or p.suffix in _WEIGHT_SUFFIXES))
    for p in files:
        h.update(f"\n{p.name}|{p.stat().st_size}\n".encode())
        with open(p, "rb") as f:
            while block := f.read(_READ):
                h.update(block)
    return h.hexdigest()


def load_base(config: D2LConfig, base_dir: str | Path | None = None, *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> BaseModel:
    """The checkpoint's base model and tokenizer, checked against the checkpoint's layer count and module sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_base_dir(config, base_dir)
    hf_logging.disable_progress_bar()
    try:
        base_config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # unreadable JSON, an unknown model type, fields that contradict each other
        raise CheckpointError(f"base model {path}: its config.json cannot be read: {' '.join(str(e).split())[:300]}") from None
    # the config first: a base of another shape is refused before its weights are read
    check_base(config, base_config, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError) as e:  # unreadable files, unknown architecture, weights of other sizes
        raise CheckpointError(f"base model {path} cannot be loaded: {' '.join(str(e).split())[:300]}") from None
    model.to(device).eval().requires_grad_(False)
    return BaseModel(model, tokenizer, path, base_identity(path.resolve()))


def check_base(config: D2LConfig, base_config, path: Path | str) -> None:
    """CheckpointError unless the base has the checkpoint's layer count, hidden size and module sizes."""
    try:
        have = modules_for_base(base_config, config.target_modules)
    except Exception as e:  # an architecture without these projections
        raise CheckpointError(f"base model {path} does not match the checkpoint: {e}") from None
    if (base_config.num_hidden_layers, base_config.hidden_size, have) != (config.n_layers, config.hidden, config.modules):
        raise CheckpointError(
            f"base model {path} does not match the checkpoint: it has {base_config.num_hidden_layers} layers, hidden size "
            f"{base_config.hidden_size} and modules {[(m.name, m.d_in, m.d_out) for m in have]}; the checkpoint was "
            f"trained on {config.base_model} with {config.n_layers} layers, hidden size {config.hidden} and modules "
            f"{[(m.name, m.d_in, m.d_out) for m in config.modules]}")
