"""Calibration batches: fixed-length token windows drawn reproducibly from the recipe's text.

`calibration.files` may name `.txt`/`.jsonl` files or directories of them; `check_calibration`
finds an empty or malformed corpus before any model is loaded, reading only until the first text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from lmpress.data.corpus import (
    Document,
    hf_dataset_documents,
    read_text_files,
    split_documents,
    stdlib_documents,
)
from lmpress.errors import LmpressError

FIELD = "calibration.files"
TEXT_SUFFIXES = (".txt", ".jsonl")
_PROBE_BYTES = 1 << 16


def calibration_files(files: list[str], field: str = FIELD) -> list[Path]:
    """The listed files, each directory replaced by its .txt/.jsonl files (sorted, recursive)."""
    out: list[Path] = []
    for i, name in enumerate(files):
        path = Path(name).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not found:
                raise LmpressError(f"{field}[{i}]: directory {path} holds no .txt or .jsonl files")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise LmpressError(f"{field}[{i}]: file not found: {path}")
    return out


def check_calibration(cal) -> list[str]:
    """Problems with local calibration files, found cheaply: missing files, directories with no
    text files, malformed JSONL, or no text at all. Other sources are checked when read."""
    if cal.source != "files":
        return []
    try:
        paths = calibration_files(cal.files)
    except LmpressError as e:
        return e.problems
    problems, has_text = [], False
    for path in paths:
        try:
            has_text |= _has_text(path, cal.text_key)
        except LmpressError as e:
            problems += e.problems
    if not problems and not has_text:
        problems.append(f"{FIELD}: the files hold no text (all {len(paths)} are blank)")
    return problems


def _has_text(path: Path, text_key: str) -> bool:
    """True when the file holds some non-blank text; JSONL: its first record is checked."""
    with path.open("r", encoding="utf-8", errors="replace") as f:
        if path.suffix != ".jsonl":
            while chunk := f.read(_PROBE_BYTES):
                if chunk.strip():
                    return True
            return False
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_key]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise LmpressError(
                    f"{FIELD}: {path} line {n + 1} is not JSON with a '{text_key}' string"
                ) from e
            if str(text).strip():
                return True
        return False


def calibration_documents(cal) -> list[Document]:
    """The recipe's calibration text. Offline text uses the *train* split only."""
    if cal.source == "offline":
        return split_documents(stdlib_documents())[0]
    if cal.source == "files":
        return read_text_files(calibration_files(cal.files), field=FIELD, text_key=cal.text_key)
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
