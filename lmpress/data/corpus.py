"""Text every Python install has, and the user's own: documents for training, calibration, eval.

The built-in offline corpus is the standard library's documentation topics (`pydoc_data`) and
its source files. The train/validation split is by document (a hash of its id), so validation
text is never seen in training, whichever subset of documents a machine has.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from lmpress.errors import LmpressError

SKIPPED_STDLIB_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def stdlib_documents() -> list[Document]:
    """Documentation topics and source files of the running Python's standard library."""
    from pydoc_data.topics import topics

    docs = [Document(f"topic:{name}", text) for name, text in sorted(topics.items())]
    lib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if SKIPPED_STDLIB_DIRS.intersection(rel.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(Document(f"src:{rel.as_posix()}", text))
    return docs


def is_validation(doc_id: str, val_fraction: float, seed: int = 0) -> bool:
    """Stable per-document coin flip: the same document lands in the same split everywhere."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_documents(
    docs: list[Document], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    train = [d for d in docs if not is_validation(d.id, val_fraction, seed)]
    val = [d for d in docs if is_validation(d.id, val_fraction, seed)]
    return train, val


def read_text_files(paths: list[str | Path], field: str = "files", text_key: str = "text"):
    """Documents from local `.txt` files (one document each) or `.jsonl` files (one per line)."""
    docs: list[Document] = []
    for i, p in enumerate(paths):
        path = Path(p)
        if not path.is_file():
            raise LmpressError(f"{field}[{i}]: file not found: {path}")
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_key]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise LmpressError(
                        f"{field}[{i}]: {path} line {n + 1} is not JSON with a '{text_key}' string"
                    ) from e
                docs.append(Document(f"{path.name}:{n}", str(text)))
        else:
            docs.append(Document(path.name, path.read_text(encoding="utf-8", errors="replace")))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise LmpressError(f"{field}: the files hold no text")
    return docs


def hf_dataset_documents(
    name: str, config: str | None, split: str, text_key: str, limit: int | None = None
) -> list[Document]:
    """Documents from a `datasets` dataset (needs network or a local datasets cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types for "not reachable / not found"
        raise LmpressError(f"calibration.dataset: cannot load '{name}': {e}") from e
    if text_key not in ds.column_names:
        raise LmpressError(f"calibration.text_key: dataset '{name}' has no column '{text_key}'")
    rows = ds if limit is None else ds.select(range(min(limit, len(ds))))
    return [Document(f"{name}:{i}", str(r[text_key])) for i, r in enumerate(rows)]
