"""Calibration batches: fixed-length token windows drawn reproducibly from the recipe's text."""

from __future__ import annotations

import random

import torch

from lmpress.data.corpus import (
    Document,
    hf_dataset_documents,
    read_text_files,
    split_documents,
    stdlib_documents,
)
from lmpress.errors import LmpressError


def calibration_documents(cal) -> list[Document]:
    """The recipe's calibration text. Offline text uses the *train* split only."""
    if cal.source == "offline":
        return split_documents(stdlib_documents())[0]
    if cal.source == "files":
        return read_text_files(cal.files, field="calibration.files", text_key=cal.text_key)
    ds = cal.dataset
    return hf_dataset_documents(ds.name, ds.config, ds.split, cal.text_key)


def calibration_batches(
    tokenizer, docs: list[Document], num_samples: int, seq_len: int, batch_size: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """`num_samples` windows of `seq_len` tokens (shorter documents are packed with EOS)."""
    if not docs:
        raise LmpressError("calibration: no calibration text")
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    stream: list[int] = []
    eos = tokenizer.eos_token_id
    need = num_samples * seq_len * 2
    for i in order:
        stream += tokenizer(docs[i].text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < seq_len:
        raise LmpressError(
            f"calibration: only {len(stream)} tokens of text, fewer than seq_len ({seq_len})"
        )
    ids = torch.tensor(stream, dtype=torch.long)
    starts = sorted(rng.randrange(0, ids.numel() - seq_len + 1) for _ in range(num_samples))
    windows = torch.stack([ids[s : s + seq_len] for s in starts])
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        for chunk in windows.split(batch_size)
    ]
