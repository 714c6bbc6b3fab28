"""Decode-step latency of the three Puzzle moves at a realistic layer shape, side by side.

The demo parent is too small for decode time to say anything on a GPU (kernel launches
dominate), so this script builds a slice of a real architecture — gpt-oss-20b's layer shapes
(hidden 2880, 32 experts of 2880, top-4, 64 query / 8 KV heads, alternating 128-window and full
attention) with fewer layers and random weights — and times, in one process with interleaved
repeats, the parent against lmpress's own transforms:

- `prune`: 25 % fewer experts per layer (`compress.experts.prune_experts`),
- `window`: the full-attention layers switched to a window (`compress.attention.apply_windows`),
- `fp8kv`: the parent served from the FP8 KV cache (`compress.kv_cache.make_fp8_cache`),
- `all`: the three together.

A step is one new token for each of `--batch` sequences that already hold `--context` tokens of
cache; time is synchronised on CUDA. Random routers spread tokens evenly over the experts, so at
batch × top-k ≳ experts every expert's weights are read each step, as in real batched serving.

    python benchmarks/bench_decode.py --device cuda --layers 6 --batch 64 --context 4096
    python benchmarks/bench_decode.py --preset tiny --device cpu     # a smoke run on a laptop
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import GptOssConfig, GptOssForCausalLM

from lmpress.compress.attention import apply_windows, layer_windows
from lmpress.compress.experts import expert_counts, prune_experts
from lmpress.compress.kv_cache import calibrate_kv_scales, make_fp8_cache
from lmpress.device import resolve_device
from lmpress.measure import cache_bytes, weight_bytes

PRESETS = {
    # gpt-oss-20b's per-layer shapes (config.json of openai/gpt-oss-20b)
    "gpt-oss-20b": dict(
        hidden_size=2880,
        intermediate_size=2880,
        num_local_experts=32,
        num_experts_per_tok=4,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        sliding_window=128,
        vocab_size=201088,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=64,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=16,
        vocab_size=512,
    ),
}


def build_parent(preset: str, layers: int, device: torch.device, dtype: torch.dtype):
    cfg = GptOssConfig(
        **PRESETS[preset],
        num_hidden_layers=layers,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2)
        + ["sliding_attention"] * (layers % 2),
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = GptOssForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # random-init routers are ~0; give routing real spread
        for layer in model.model.layers:
            layer.mlp.router.weight.normal_(0, 0.02)
    return model


def variants(parent, keep_ratio: float, window: int, calib: torch.Tensor) -> dict:
    """name -> (model, cache factory); every model is its own copy, the parent untouched."""
    counts = expert_counts(parent)
    keep = {i: list(range(round(n * keep_ratio))) for i, n in counts.items()}
    full_layers = {i: window for i, w in enumerate(layer_windows(parent)) if w is None}

    pruned = prune_experts_copy(parent, keep)
    windowed = apply_windows(copy.deepcopy(parent), full_layers)
    both = apply_windows(prune_experts_copy(parent, keep), full_layers)
    scales_parent = calibrate_kv_scales(parent, [{"input_ids": calib}], progress=False)
    scales_both = calibrate_kv_scales(both, [{"input_ids": calib}], progress=False)
    dyn = lambda m: None  # noqa: E731 - the model's own DynamicCache
    return {
        "parent": (parent, dyn),
        "prune": (pruned, dyn),
        "window": (windowed, dyn),
        "fp8kv": (parent, lambda m: make_fp8_cache(m, scales_parent)),
        "all": (both, lambda m: make_fp8_cache(m, scales_both)),
    }


def prune_experts_copy(parent, keep):
    child = copy.deepcopy(parent)
    prune_experts(child, keep)
    return child


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def filled_cache(model, make_cache, batch: int, context: int, device):
    """A cache already holding `context` tokens per sequence, written through the cache's own
    `update` (so FP8 layers quantize and window layers keep only their window). Random K/V:
    decode cost depends on the sizes, not the values, and a real prefill of a long batch would
    need eager attention's [batch, heads, context, context] scores."""
    from transformers import DynamicCache

    cfg = model.config
    cache = make_cache(model) or DynamicCache(config=cfg)
    shape = (batch, cfg.num_key_value_heads, context, cfg.head_dim)
    g = torch.Generator(device=device).manual_seed(2)
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(shape, generator=g, device=device, dtype=model.dtype)
        v = torch.randn(shape, generator=g, device=device, dtype=model.dtype)
        cache.update(k, v, i)
    return cache


@torch.no_grad()
def time_decode(model, make_cache, batch: int, context: int, steps: int, device) -> dict:
    """`steps` one-token decode steps over a `context`-token cache: median ms per step."""
    cache = filled_cache(model, make_cache, batch, context, device)
    nxt = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    per_step = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        per_step.append(time.perf_counter() - t0)
    return {"decode_ms": 1000 * statistics.median(per_step), "kv_bytes": cache_bytes(cache)}


@torch.no_grad()
def time_moe(model, batch: int, steps: int, device) -> float:
    """The MoE blocks alone on one decode step's hidden states, summed over layers, in ms:
    the part of a step that expert pruning acts on."""
    hidden = torch.randn(batch, 1, model.config.hidden_size, device=device, dtype=model.dtype)
    per_step = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        for layer in model.model.layers:
            layer.mlp(hidden)
        sync(device)
        per_step.append(time.perf_counter() - t0)
    return 1000 * statistics.median(per_step)


@torch.no_grad()
def time_prefill(model, make_cache, context: int, device) -> float:
    """One sequence of `context` tokens through the model into a fresh cache, in ms."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    cache = make_cache(model)
    sync(device)
    t0 = time.perf_counter()
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync(device)
    return 1000 * (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpt-oss-20b")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--prefill-context", type=int, default=2048, help="one sequence's prompt")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--keep-ratio", type=float, default=0.75)
    ap.add_argument("--window", type=int, default=1024, help="window for the full layers")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    device = resolve_device(args.device, "--device")
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    parent = build_parent(args.preset, args.layers, device, dtype)
    calib = torch.randint(0, parent.config.vocab_size, (2, min(args.context, 512))).to(device)
    models = variants(parent, args.keep_ratio, args.window, calib)
    print(f"built {len(models)} variants in {time.perf_counter() - t0:.1f} s on {device}")
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device))

    runs: dict[str, list[dict]] = {name: [] for name in models}
    for m, mk in models.values():  # warm-up: kernels, allocator
        time_decode(m, mk, args.batch, min(args.context, 256), 2, device)
        time_prefill(m, mk, min(args.prefill_context, 256), device)
    for _ in range(args.repeats):  # interleaved so drift hits every variant alike
        for name, (m, mk) in models.items():
            r = time_decode(m, mk, args.batch, args.context, args.steps, device)
            r["prefill_ms"] = time_prefill(m, mk, args.prefill_context, device)
            r["moe_ms"] = time_moe(m, args.batch, args.steps, device)
            runs[name].append(r)

    base = _summary(runs["parent"])
    print(
        f"\n{args.preset} × {args.layers} layers, batch {args.batch}, context {args.context}, "
        f"{args.steps} steps × {args.repeats} repeats; "
        f"prefill: 1 × {args.prefill_context} tokens ({args.dtype})"
    )
    head = f"{'variant':8} {'weight GB':>10} {'KV GB':>8} {'decode ms':>10} {'[min, max]':>16} "
    head += f"{'MoE ms':>7} {'prefill ms':>11} {'decode ×':>9} {'MoE ×':>6} {'weights ×':>10}"
    print(head + f"{'KV ×':>6}")
    for name, (m, _) in models.items():
        s = _summary(runs[name])
        wb = weight_bytes(m)
        print(
            f"{name:8} {wb / 1e9:10.2f} {s['kv_bytes'] / 1e9:8.3f} {s['decode_ms']:10.2f} "
            f"[{s['lo']:6.2f}, {s['hi']:6.2f}] {s['moe_ms']:7.2f} {s['prefill_ms']:11.1f} "
            f"{s['decode_ms'] / base['decode_ms']:9.3f} {s['moe_ms'] / base['moe_ms']:6.3f} "
            f"{wb / weight_bytes(parent):10.3f} "
            f"{s['kv_bytes'] / base['kv_bytes']:6.3f}"
        )


def _summary(rs: list[dict]) -> dict:
    d = [r["decode_ms"] for r in rs]
    return {
        "decode_ms": statistics.median(d),
        "lo": min(d),
        "hi": max(d),
        "prefill_ms": statistics.median(r["prefill_ms"] for r in rs),
        "moe_ms": statistics.median(r["moe_ms"] for r in rs),
        "kv_bytes": rs[0]["kv_bytes"],
    }


if __name__ == "__main__":
    main()
