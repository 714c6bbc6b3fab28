"""Short healing after a transplant: train only the embedding rows, everything else frozen.

ReTok's recipe (train embeddings and LM head first): the body of the model already works, only
the new tokens' rows are guesses. `rows="new"` trains just the rows the transplant estimated
(shared tokens stay bit-for-bit: their gradient is masked, and Adam with zero gradient and no
weight decay leaves a row exactly as it was); `rows="all"` trains the whole matrices. Tied
models train their one matrix; untied ones the input and output matrices (and an LM-head bias).
The loss is plain next-token cross-entropy on the target corpus, packed with eos between
documents, in random windows drawn with a fixed seed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpress.errors import LmpressError

FIELD = "transplant_tokenizer.heal"


def heal_embeddings(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    tokens: int,
    new_rows: Sequence[int] | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Train the embedding rows for about `tokens` tokens; returns steps, loss, seconds.

    `new_rows`: the only rows that change (None: all rows).
    """
    stream = _token_stream(tokenizer, texts)
    if stream.numel() <= seq_len + 1:
        raise LmpressError(
            f"{FIELD}.seq_len: the corpus has {stream.numel()} tokens, fewer than one window"
        )
    params = _embedding_params(model)
    mask = None
    if new_rows is not None:
        mask = torch.zeros(params[0].shape[0], 1, device=params[0].device)
        mask[list(new_rows)] = 1
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = []
    for p in params:
        p.requires_grad_(True)
        if mask is not None:  # [vocab, hidden] or [vocab] (bias)
            hooks.append(p.register_hook(lambda g, m=mask: g * (m if g.ndim == 2 else m[:, 0])))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    steps = max(1, math.ceil(tokens / (batch_size * seq_len)))
    gen = torch.Generator().manual_seed(seed)
    device = params[0].device
    was_training = model.training
    model.train()
    t0, losses = time.perf_counter(), []
    try:
        for _ in range(steps):
            starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=gen)
            batch = torch.stack([stream[s : s + seq_len] for s in starts.tolist()]).to(device)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        for h in hooks:
            h.remove()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    tenth = max(1, len(losses) // 10)  # single batches are noisy: mean of a tenth each
    return {
        "steps": steps,
        "tokens": steps * batch_size * seq_len,
        "first_loss": sum(losses[:tenth]) / tenth,
        "final_loss": sum(losses[-tenth:]) / tenth,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _embedding_params(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    """The input matrix, the output matrix if it is a different tensor, and an LM-head bias."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    params = [inp.weight]
    if out is not None and out.weight is not inp.weight:
        params.append(out.weight)
    if out is not None and getattr(out, "bias", None) is not None:
        params.append(out.bias)
    return params


def _token_stream(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> torch.Tensor:
    """All texts as one id stream with eos between documents (standard LM packing)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # no max-length warnings, faster
    if backend is not None:
        encoded = [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    else:
        encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    eos = tokenizer.eos_token_id
    return torch.tensor([t for ids in encoded for t in [*ids, eos]], dtype=torch.long)
