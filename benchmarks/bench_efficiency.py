"""Side-by-side request-level efficiency of two tiny gpt-oss models (8 experts vs 4).

The form every performance claim of lmpress takes: the same requests served by A and B in one
process, repeats interleaved, and B/A for every metric with its spread. Tiny random models, so
the numbers say how the harness behaves, not how a real model compresses.

    python benchmarks/bench_efficiency.py --repeats 5 --concurrency 4 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import random

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import GptOssConfig, GptOssForCausalLM, PreTrainedTokenizerFast

from lmpress.evaluate.efficiency import Workload, compare, format_comparison, spread_prompts

WORDS = [f"w{i}" for i in range(500)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed vocabulary: offline and deterministic."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def build_model(tok: PreTrainedTokenizerFast, experts: int, device: str, seed: int):
    torch.manual_seed(seed)
    cfg = GptOssConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=experts,
        num_experts_per_tok=2,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager",
    )
    model = GptOssForCausalLM(cfg).to(device).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def corpus(n: int, seed: int) -> list[str]:
    """Stand-in for evaluation texts: word strings of varied length."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(4, 96))) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts-a", type=int, default=8)
    p.add_argument("--experts-b", type=int, default=4)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="fixed-length outputs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    tok = build_tokenizer()
    a = build_model(tok, args.experts_a, args.device, args.seed)
    b = build_model(tok, args.experts_b, args.device, args.seed)
    workload = Workload(
        prompts=spread_prompts(corpus(200, args.seed), args.requests, seed=args.seed),
        max_new_tokens=args.max_new_tokens,
        concurrency=args.concurrency,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    labels = (f"{args.experts_a} experts", f"{args.experts_b} experts")
    print(format_comparison(compare(a, b, tok, workload, labels=labels)))


if __name__ == "__main__":
    main()
