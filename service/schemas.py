"""Request and response models of the HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, model_validator

Dtype = Literal["float32", "bfloat16", "float16"]
Format = Literal["safetensors", "peft-tar"]


class AdapterInput(BaseModel):
    """Exactly one of: a task description, a document, or a task embedding (already preprocessed)."""

    model_config = ConfigDict(extra="forbid")
    task: str | None = Field(None, description="what the adapter should make the model do",
                             examples=["answer grade-school math step by step"])
    document: str | None = Field(None, description="a text the adapter should specialise on; long texts are chunked")
    # strict: a JSON boolean or a string is refused, not read as 1.0 or parsed (an integer is a number)
    embedding: list[StrictFloat] | None = Field(None, description="a task embedding of the checkpoint's size E")

    @model_validator(mode="after")
    def _exactly_one(self) -> AdapterInput:
        given = [k for k in ("task", "document", "embedding") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of task, document, embedding (got {', '.join(given) or 'none'})")
        return self


# what an adapter's tensors are stored in; none given: what the server computes in (float32, or bfloat16 with
# bfloat16 compute: its adapters then hold exactly what was computed, in half the bytes)
DTYPE_DOC = "the adapter's tensor dtype; default: the server's compute dtype (float32 unless it computes in bfloat16)"


class GenerateRequest(AdapterInput):
    checkpoint: str | None = Field(None, description="checkpoint id; default: the server's default")
    dtype: Dtype | None = Field(None, description=DTYPE_DOC)
    format: Format = "safetensors"


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[AdapterInput] = Field(..., min_length=1)
    checkpoint: str | None = None
    dtype: Dtype | None = Field(None, description=DTYPE_DOC)


class BatchItem(BaseModel):
    id: str
    size: int
    cache: Literal["hit", "miss"]


class BatchResponse(BaseModel):
    adapters: list[BatchItem]


class CombineItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., pattern=r"^[0-9a-f]{64}$", description="a cached adapter's id (its X-Adapter-Id)")
    # strict, as an embedding's values: a JSON boolean or string is refused (an integer is a number)
    weight: StrictFloat = Field(1.0, description="what its update is multiplied by; finite, may be 0 or negative")


class CombineRequest(BaseModel):
    """Cached adapters of one base model and one set of modules, stacked with a weight each (docs/api.md)."""

    model_config = ConfigDict(extra="forbid")
    adapters: list[CombineItem] = Field(..., description="2 to 32 adapters, in order (the order is part of the id)")
    dtype: Dtype | None = Field(None, description="the stacked adapter's dtype; default: the sources' common dtype, "
                                "else float32")
    format: Format = "safetensors"
