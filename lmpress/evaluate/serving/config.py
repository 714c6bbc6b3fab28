"""What a serving measurement is asked to do: the workload, the repeats, the efforts."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ServingConfig(BaseModel):
    """Request-level serving cost, measured on held-out next-line requests after each stage.

    The one serving configuration: the recipe's `efficiency` section, `lmpress bench`'s options
    and the search's per-trial request rate are all this model.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    requests: int = Field(16, ge=1, description="requests per run")
    concurrency: int = Field(4, ge=1, description="requests served at once (batched, KV cache)")
    max_new_tokens: int = Field(32, ge=1, description="budget for named efforts")
    efforts: list[int | str] = Field(
        default_factory=lambda: [8, 32],
        min_length=1,
        description="token budgets, or reasoning-effort names the chat template takes; "
        "the last one is the headline",
    )
    repeats: int = Field(2, ge=1)
    warmup: int = Field(1, ge=0)

    @field_validator("efforts")
    @classmethod
    def _budgets_positive(cls, v: list[int | str]) -> list[int | str]:
        for i, e in enumerate(v):
            if isinstance(e, int) and e < 1:
                raise ValueError(f"item {i} ({e}): a token budget must be ≥ 1")
        return v

    stop_at_newline: bool = Field(True, description="a request completes one line of text")
    after_each_stage: bool = True
