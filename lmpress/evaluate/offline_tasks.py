"""Data for lmpress's offline lm-eval tasks, generated from held-out standard-library text.

Tasks, defined as lm-eval YAML in `lmpress/evaluate/tasks/`:
- `stdlib_bpb` (loglikelihood_rolling): bits per byte on held-out passages; comparable across
  tokenizers because it divides by bytes, not tokens.
- `stdlib_code_bpb`: the same on held-out Python source files only (the target domain of a
  code tokenizer; `code_documents` of the train side is what such a tokenizer trains on).
- `stdlib_mc` (multiple_choice): pick the true next line of a held-out passage among
  distractor lines with the same indentation taken from other held-out documents.
  The shared indentation, all but its last space, ends the context: byte-level BPE
  pre-tokenizes "\n" + indentation as one token and the last space with the next word, so
  cutting there gives the model the token boundary it saw in training.
- `stdlib_mc_whole`: the same items scored as whole passages (the context's last lines +
  candidate, one log-likelihood each). lm-eval's multiple choice encodes context and continuation
  apart, which breaks any token that crosses the cut (Supertokens span whitespace); scoring
  the whole text under the model's own segmentation is fair to every tokenizer.

The documents come from the validation side of the same document-level split the demo parent
is trained on, so no task text was seen in training. Data are written once per corpus version
into the cache and are independent of any model or tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

from lmpress import atomic
from lmpress.cache import cache_dir
from lmpress.data.corpus import Document, split_documents, stdlib_documents

TASKS_DIR = Path(__file__).parent / "tasks"
OFFLINE_TASKS = ("stdlib_bpb", "stdlib_code_bpb", "stdlib_mc", "stdlib_mc_whole")
DATA_FILES = ("stdlib_bpb", "stdlib_code_bpb", "stdlib_mc")  # stdlib_mc_whole reads stdlib_mc
CODE_PREFIX = "src:"  # corpus.stdlib_documents names source files src:<path>
DATA_VERSION = 2
VAL_FRACTION = 0.1
PASSAGE_CHARS = 1500
NUM_PASSAGES = 200
NUM_MC_ITEMS = 300
MC_CONTEXT_CHARS = 400
MC_CHOICES = 4
MC_MIN_LINE_CHARS = 16
MC_MAX_LINE_CHARS = 100


def task_data_dir() -> Path:
    """Where the task data for this Python's standard library live (built on first use)."""
    key = hashlib.sha256(f"{DATA_VERSION}:{sys.version}".encode()).hexdigest()[:12]
    path = cache_dir() / "tasks" / f"stdlib-{key}"
    if not all((path / f"{name}.jsonl").is_file() for name in DATA_FILES):
        _, val = split_documents(stdlib_documents(), VAL_FRACTION)
        write_task_data(val, path)
    return path


def write_task_data(val_docs: list[Document], path: Path, seed: int = 0) -> None:
    with atomic.directory(path) as tmp:
        _write_jsonl(tmp / "stdlib_bpb.jsonl", bpb_passages(val_docs, seed))
        _write_jsonl(tmp / "stdlib_mc.jsonl", mc_items(val_docs, seed))
        _write_jsonl(tmp / "stdlib_code_bpb.jsonl", bpb_passages(code_documents(val_docs), seed))


def code_documents(docs: list[Document]) -> list[Document]:
    """The Python source files among `docs` (not the documentation topics)."""
    return [d for d in docs if d.id.startswith(CODE_PREFIX)]


def train_documents(code_only: bool = False) -> list[Document]:
    """The train side of the split the task data are held out from (never a task document)."""
    train, _ = split_documents(stdlib_documents(), VAL_FRACTION)
    return code_documents(train) if code_only else train


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def bpb_passages(docs: list[Document], seed: int = 0) -> list[dict]:
    """Passages of about PASSAGE_CHARS, cut at line boundaries, sampled across documents."""
    passages = []
    for doc in docs:
        chunk: list[str] = []
        size = 0
        for line in doc.text.splitlines(keepends=True):
            chunk.append(line)
            size += len(line)
            if size >= PASSAGE_CHARS:
                passages.append({"id": f"{doc.id}:{len(passages)}", "text": "".join(chunk)})
                chunk, size = [], 0
    passages = [p for p in passages if p["text"].strip()]
    random.Random(seed).shuffle(passages)
    return sorted(passages[:NUM_PASSAGES], key=lambda p: p["id"])


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _candidate_lines(doc: Document) -> list[tuple[int, str]]:
    """(offset, line) pairs usable as an answer: long enough and not only punctuation."""
    out, offset = [], 0
    for line in doc.text.splitlines(keepends=True):
        body = line.strip()
        if MC_MIN_LINE_CHARS <= len(body) <= MC_MAX_LINE_CHARS and any(c.isalpha() for c in body):
            out.append((offset, line if line.endswith("\n") else line + "\n"))
        offset += len(line)
    return out


def mc_items(docs: list[Document], seed: int = 0) -> list[dict]:
    """Next-line multiple choice: context = the preceding text, distractors share indentation."""
    rng = random.Random(seed)
    lines = {d.id: _candidate_lines(d) for d in docs}
    pool_by_indent: dict[str, list[tuple[str, str]]] = {}
    for doc_id, cands in lines.items():
        for _, line in cands:
            pool_by_indent.setdefault(_indent(line), []).append((doc_id, line))
    texts = {d.id: d.text for d in docs}
    eligible = [d.id for d in docs if len(lines[d.id]) > 4]
    items: list[dict] = []
    attempts = 0
    while len(items) < NUM_MC_ITEMS and attempts < NUM_MC_ITEMS * 20 and eligible:
        attempts += 1
        doc_id = rng.choice(eligible)
        offset, answer = rng.choice(lines[doc_id])
        if offset < MC_CONTEXT_CHARS // 2:
            continue
        start = texts[doc_id].rfind("\n", 0, max(0, offset - MC_CONTEXT_CHARS)) + 1
        context = texts[doc_id][start:offset]
        pool = [ln for other, ln in pool_by_indent.get(_indent(answer), []) if other != doc_id]
        distractors = list({ln for ln in pool if ln != answer})
        if len(distractors) < MC_CHOICES - 1:
            continue
        choices = [answer, *rng.sample(sorted(distractors), MC_CHOICES - 1)]
        rng.shuffle(choices)
        cut = max(len(_indent(answer)) - 1, 0)
        items.append(
            {
                "id": f"{doc_id}@{offset}",
                "context": context + answer[:cut],
                "choices": [c[cut:] for c in choices],
                "label": choices.index(answer),
            }
        )
    return items


def load_task_docs(task: str) -> list[dict]:
    path = task_data_dir() / f"{task}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
