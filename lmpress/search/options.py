"""The options of a Puzzle search that the search's own functions take (costing, evaluating,
the study); the `puzzle_search` stage composes them into its recipe schema."""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from lmpress.evaluate.serving.config import ServingConfig

MEASURED = ("weight_bytes", "kv_bytes", "decode_ms", "prefill_ms")
DECODE_BYTES = "decode_bytes"
COSTS = (*MEASURED, DECODE_BYTES)
ANALYTIC = ("weight_bytes", "kv_bytes", DECODE_BYTES)
DECODE_BYTES_MEANS = (
    "bytes one decode step reads: every weight once plus the KV cache of batch_size sequences at "
    "context_len (memory-bound decode model)"
)


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CostOptions(_Options):
    """Where blocks are costed: one decode step of `batch_size` sequences at `context_len`."""

    kind: Literal["measured", "analytic"] = Field(
        "measured", description="time and weigh blocks on the device, or bytes from shapes only"
    )
    batch_size: int = Field(16, ge=1, description="sequences decoded together")
    context_len: int = Field(256, ge=1, description="tokens already in every sequence's cache")
    prefill_batch_size: int = Field(1, ge=1)
    warmup: int = Field(3, ge=0)
    repeats: int = Field(10, ge=1)


class EvalOptions(_Options):
    """lm-eval bits per byte, for `compare_uniform` and the study's quality objective."""

    task: str = "stdlib_bpb"
    limit: int | None = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int | None = Field(256, ge=16)


class StudyOptions(_Options):
    """Optuna multi-objective search: quality of the assembled model vs its request rate."""

    trials: int = Field(8, ge=1, description="complete trials the study should hold")
    storage: str | None = Field(
        None, description="SQLAlchemy URL or journal file; null = SQLite in the stage work dir"
    )
    study_name: str = "puzzle"
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seeds: int = Field(3, ge=1, description="diverse MIP solutions enqueued as first trials")
    quality: Literal["bits_per_byte", "kl"] = Field(
        "bits_per_byte", description="lm-eval bits/byte (`evaluation`) or held-out KL"
    )
    efficiency: ServingConfig = Field(
        default_factory=lambda: ServingConfig(
            requests=8, concurrency=4, max_new_tokens=16, efforts=[16], repeats=1
        ),
        description="the serving workload each trial's request rate is measured on",
    )


class SearchOptions(Protocol):
    """What trial evaluation reads from a search's options (the stage satisfies it)."""

    cost: CostOptions
    study: StudyOptions
    evaluation: EvalOptions
