"""Build, train and cache a demo parent on the standard library's text.

First use trains it (minutes on 2 CPU cores); later uses load the cached checkpoint. The
training text is the train side of a document-level split; validation bits-per-byte is
measured on the held-out side and recorded in `lmpress_demo.json` next to the weights.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, GptOssConfig, GptOssForCausalLM
from transformers.optimization import get_cosine_schedule_with_warmup

from lmpress import atomic
from lmpress.cache import cache_dir
from lmpress.data.corpus import split_documents, stdlib_documents
from lmpress.demo.spec import DEMO_PARENTS, DemoSpec
from lmpress.demo.tokenizer import CHAT_TOKENS, train_demo_tokenizer
from lmpress.errors import LmpressError
from lmpress.export import save_checkpoint

log = logging.getLogger(__name__)
BUILD_INFO = "lmpress_demo.json"


def demo_dir(name: str) -> Path:
    if name not in DEMO_PARENTS:
        raise LmpressError(f"unknown demo parent '{name}' (known: {', '.join(DEMO_PARENTS)})")
    spec = DEMO_PARENTS[name]
    return cache_dir() / "demo" / f"{spec.name}-{spec.cache_key()}"


def build_info(name: str) -> dict | None:
    path = demo_dir(name) / BUILD_INFO
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_demo_parent(name: str, force: bool = False, progress: bool = True) -> Path:
    """Return the cached checkpoint of demo parent `name`, building it first if needed."""
    out = demo_dir(name)
    if (out / BUILD_INFO).is_file() and not force:
        return out
    spec = DEMO_PARENTS[name]
    log.info("building demo parent %s (first use; cached at %s)", name, out)
    start = time.perf_counter()
    with atomic.directory(out) as tmp:
        info = _build(spec, tmp, progress)
        info["build_seconds"] = round(time.perf_counter() - start, 1)
        atomic.write_json(tmp / BUILD_INFO, info)
    log.info(
        "demo parent %s built in %.0f s: validation bits/byte %.3f",
        name,
        info["build_seconds"],
        info["val_bits_per_byte"],
    )
    return out


def _build(spec: DemoSpec, out: Path, progress: bool) -> dict:
    torch.manual_seed(spec.seed)
    docs = stdlib_documents()[: spec.max_documents]
    train_docs, val_docs = split_documents(docs, spec.val_fraction, spec.seed)
    t0 = time.perf_counter()
    tokenizer = train_demo_tokenizer((d.text for d in train_docs), spec.vocab_size)
    log.info("tokenizer: %d tokens in %.1f s", len(tokenizer), time.perf_counter() - t0)
    train_ids = _token_stream(tokenizer, [d.text for d in train_docs])
    val_ids = _token_stream(tokenizer, [d.text for d in val_docs])

    eos_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    config = GptOssConfig(
        vocab_size=len(tokenizer),
        eos_token_id=eos_ids[0],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **spec.model,
    )
    config._attn_implementation = "eager"
    model = GptOssForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    t0 = time.perf_counter()
    final_loss = _train(model, train_ids, spec, progress)
    train_seconds = time.perf_counter() - t0
    model.eval()
    val_bpb = bits_per_byte(model, tokenizer, val_ids, spec)
    save_checkpoint(model, tokenizer, out / "_ckpt")
    for f in (out / "_ckpt").iterdir():
        f.rename(out / f.name)
    (out / "_ckpt").rmdir()
    return {
        "name": spec.name,
        "cache_key": spec.cache_key(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "train_tokens_seen": spec.steps * spec.batch_size * spec.seq_len,
        "train_tokens_available": int(train_ids.numel()),
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": round(final_loss, 4),
        "val_bits_per_byte": round(val_bpb, 4),
        "chat_special_tokens": CHAT_TOKENS,
    }


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one id stream, separated by EOS (the standard packing for LM training)."""
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    flat = [t for ids in enc for t in [*ids, eos]]
    return torch.tensor(flat, dtype=torch.long)


def _train(model: GptOssForCausalLM, ids: torch.Tensor, spec: DemoSpec, progress: bool) -> float:
    gen = torch.Generator().manual_seed(spec.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": spec.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )
    sched = get_cosine_schedule_with_warmup(opt, spec.warmup_steps, spec.steps)
    model.train()
    ema = None
    bar = tqdm(range(spec.steps), desc=f"train {spec.name}", disable=not progress)
    for _ in bar:
        starts = torch.randint(0, ids.numel() - spec.seq_len - 1, (spec.batch_size,), generator=gen)
        batch = torch.stack([ids[s : s + spec.seq_len] for s in starts.tolist()])
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = out.loss.item() if ema is None else 0.95 * ema + 0.05 * out.loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
    return float(ema)


@torch.no_grad()
def bits_per_byte(model, tokenizer, ids: torch.Tensor, spec: DemoSpec) -> float:
    """Next-token NLL over evenly spaced validation windows, in bits per UTF-8 byte predicted."""
    token_bytes = torch.tensor(
        [
            0 if t in tokenizer.all_special_tokens else len(t)
            for t in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))
        ],
        dtype=torch.float64,
    )
    n = min(spec.val_windows, ids.numel() // spec.seq_len)
    total_nats, total_bytes = 0.0, 0.0
    for i in range(n):
        window = ids[i * spec.seq_len : (i + 1) * spec.seq_len].unsqueeze(0)
        logits = model(input_ids=window).logits[0, :-1].float()
        target = window[0, 1:]
        total_nats += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        total_bytes += token_bytes[target].sum().item()
    return total_nats / math.log(2) / max(total_bytes, 1.0)
