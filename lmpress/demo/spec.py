"""What each demo parent is: architecture, tokenizer and training budget, as plain data."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field

DEMO_VERSION = 1


@dataclass(frozen=True)
class DemoSpec:
    name: str
    family: str
    vocab_size: int
    model: dict = field(default_factory=dict)
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 600
    lr: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.1
    val_fraction: float = 0.1
    val_windows: int = 48
    max_documents: int | None = None  # None: the whole corpus (tests use a few documents)
    seed: int = 0

    def cache_key(self) -> str:
        """Changes whenever the spec, the demo code version or the corpus (Python) changes."""
        blob = json.dumps([asdict(self), DEMO_VERSION, sys.version], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# A GPT-OSS-architecture MoE: alternating sliding/full attention with sinks, 8 experts, top-2.
GPT_OSS_MOE = DemoSpec(
    name="gpt-oss-moe",
    family="gpt_oss",
    vocab_size=4096,
    model=dict(
        hidden_size=192,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=128,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        router_aux_loss_coef=0.02,
    ),
)

DEMO_PARENTS: dict[str, DemoSpec] = {GPT_OSS_MOE.name: GPT_OSS_MOE}
