"""Stage `transplant_tokenizer`: give the model a tokenizer trained for a target domain.

Trains (or loads) the target tokenizer, initialises the new embedding rows with TokenAdapt (or
a baseline) and, optionally, heals the rows briefly. Bits per byte decides, since it does not
depend on the tokenizer: the stage scores held-out text of the target domain and of the
original one for the parent and for the chosen method, and, side by side in the same run, for
each baseline in `compare_with` (each on a copy of the model, so it costs one model copy at a
time); it also records the paper's perplexity ratio (for comparison only) and the compression
of the old tokenizer, plain BPE and Supertokens at the same vocabulary size.

The built-in corpus is the train side of the document split the offline tasks are held out
from, so the tokenizer never sees an evaluation document; with `files` or a `dataset` keeping
the evaluation text out of the corpus is the user's job.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lmpress.bundle import Bundle
from lmpress.errors import LmpressError
from lmpress.stages.base import StageConfig, StageContext
from lmpress.tokenizers import evaluate as tok_eval
from lmpress.tokenizers.heal import heal_embeddings
from lmpress.tokenizers.train import compression_stats, train_bpe
from lmpress.tokenizers.transplant import (
    FIELD,
    HiddenStateSpace,
    InputEmbeddingSpace,
    shared_tokens,
    token_keys,
    transplant_embeddings,
)

BPB_TASKS = ("stdlib_code_bpb", "stdlib_bpb")  # offline rolling tasks whose texts we can read


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizerCorpus(_Options):
    """Text the target tokenizer is trained on (and healing trains on)."""

    source: Literal["offline_code", "offline", "files", "dataset"] = Field(
        "offline_code",
        description="offline_code: the standard library's Python sources (train side of the "
        "split); offline: its sources and docs; files: .txt/.jsonl; dataset: a `datasets` name",
    )
    files: list[str] = Field(default_factory=list)
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_key: str = "text"
    max_documents: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _source_has_data(self) -> TokenizerCorpus:
        if self.source == "files" and not self.files:
            raise ValueError("source is 'files' but no files are listed")
        if self.source == "dataset" and not self.dataset:
            raise ValueError("source is 'dataset' but no dataset is named")
        return self


class Scoring(_Options):
    """Held-out texts scored inside the stage (lm-eval rolling log-likelihood)."""

    target: str = Field("stdlib_code_bpb", description="offline bpb task of the target domain")
    original: str | None = Field("stdlib_bpb", description="offline bpb task of the parent's")
    limit: int | None = Field(100, ge=1, description="texts per task (None = all)")
    max_length: int = Field(256, ge=16, description="tokens per rolling window")
    batch_size: int = Field(8, ge=1)

    @field_validator("target", "original")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in BPB_TASKS:
            raise ValueError(f"must be one of {', '.join(BPB_TASKS)}")
        return v

    def tasks(self) -> list[str]:
        return [t for t in (self.target, self.original) if t is not None]


class Healing(_Options):
    """Optional short training of the embedding rows only (ReTok's first phase)."""

    tokens: int = Field(ge=1, description="training tokens (steps = tokens / batch / seq_len)")
    rows: Literal["new", "all"] = Field("new", description="new: only the estimated rows")
    lr: float = Field(1e-3, gt=0)
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(8, ge=1)


class TransplantTokenizer(StageConfig):
    """Replace the tokenizer; TokenAdapt initialises the new tokens' input and output rows."""

    stage: Literal["transplant_tokenizer"] = "transplant_tokenizer"
    tokenizer: str | None = Field(None, description="a saved target tokenizer to use as is")
    corpus: TokenizerCorpus = Field(default_factory=TokenizerCorpus)
    vocab_size: int = Field(16384, ge=257, description="entries, special tokens included")
    supertokens: bool = Field(False, description="transplant the Supertokens variant")
    chunking: Literal["chars", "words"] = Field("words", description="Supertokens chunks")
    max_words: int = Field(4, ge=1, description="words per chunk with chunking: words")
    min_frequency: int = Field(2, ge=1)
    method: Literal["tokenadapt", "mean", "random"] = "tokenadapt"
    temperature: float = Field(0.3, gt=0)
    global_weight: float = Field(0.3, ge=0, le=1)
    top_k: int = Field(3, ge=1)
    threshold: float = 0.0
    aux_space: Literal["hidden_states", "input_embeddings"] = "hidden_states"
    aux_layer: int | None = Field(None, description="hidden_states layer (default: middle)")
    compare_with: list[Literal["tokenadapt", "mean", "random"]] = Field(
        default_factory=list, description="baselines scored side by side (not kept)"
    )
    scoring: Scoring | None = Field(default_factory=Scoring)
    heal: Healing | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TransplantTokenizer:
        if self.method in self.compare_with:
            raise ValueError(f"compare_with: {self.method!r} is already the method")
        if self.compare_with and self.scoring is None:
            raise ValueError("compare_with needs scoring (it compares bits per byte)")
        return self

    @classmethod
    def report(cls, summary: dict) -> list[str]:
        """Bits per byte of every initialisation per domain, then compression per tokenizer."""
        scores = {**summary.get("zero_shot", {}), **summary.get("healed", {})}
        tasks = list(dict.fromkeys(t for row in scores.values() for t in row))
        lines = []
        if scores:
            lines += [
                "| model | " + " | ".join(f"{t} bits/byte ↓" for t in tasks) + " |",
                "|" + "---|" * (len(tasks) + 1),
            ]
            for name, row in scores.items():
                cells = [f"{row[t]['bits_per_byte']:.4f}" if t in row else "–" for t in tasks]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for task, c in summary.get("compression", {}).items():
            kinds = [k for k in ("old", "bpe", "supertokens") if k in c]
            lines += [
                "",
                f"Compression on {task}: "
                + ", ".join(
                    f"{k} {c[k]['bytes_per_token']:.2f} bytes/token "
                    f"({c[k]['tokens_per_word']:.2f} tokens/word)"
                    for k in kinds
                )
                + (
                    f"; Supertokens over BPE {c['supertokens_over_bpe_bytes_per_token']:.3f}×"
                    if "supertokens_over_bpe_bytes_per_token" in c
                    else ""
                )
                + (
                    f"; new/old tokens {c['new_over_old_tokens']:.3f}×"
                    if "new_over_old_tokens" in c
                    else ""
                ),
            ]
        return lines

    def preflight(self, config, tokenizer=None) -> list[str]:
        """Files the stage reads, checked before any weights are loaded."""
        problems = [
            f"corpus.files[{i}]: file not found: {f}"
            for i, f in enumerate(self.corpus.files)
            if self.corpus.source == "files" and not Path(f).expanduser().exists()
        ]
        if self.tokenizer is not None and not Path(self.tokenizer).expanduser().is_dir():
            problems.append(f"tokenizer: directory not found: {self.tokenizer}")
        return problems

    def expected_config(self, config):
        """The vocabulary becomes the target tokenizer's."""
        if self.tokenizer is not None:
            return config
        config = copy.deepcopy(config)
        config.get_text_config().vocab_size = self.vocab_size
        return config

    def apply(self, bundle: Bundle, ctx: StageContext) -> Bundle:
        try:
            return self._apply(bundle, ctx)
        except LmpressError as e:  # the library names `transplant_tokenizer.<option>`
            raise LmpressError(*[p.removeprefix(f"{FIELD}.") for p in e.problems]) from e

    def _apply(self, bundle: Bundle, ctx: StageContext) -> Bundle:
        model, old = bundle.model, bundle.tokenizer
        texts = self._corpus_texts() if self.tokenizer is None or self.heal else []
        tasks = self.scoring.tasks() if self.scoring else []
        held_out = {task: _task_texts(task, self.scoring) for task in tasks}
        new, compression = self._target_tokenizer(texts, old, held_out, ctx)
        summary = ctx.summary
        summary["tokenizer"] = self._describe(new, old)
        summary["compression"] = compression
        scores: dict[str, dict] = {}
        if self.scoring:
            scores["parent"] = self._score(model, old, held_out)
            for method in self.compare_with:  # each on a copy, scored, then dropped
                twin = copy.deepcopy(model)
                self._transplant(twin, old, new, method, {}, ctx)
                scores[method] = self._score(twin, new, held_out)
                del twin
        report: dict = {}
        self._transplant(model, old, new, self.method, report, ctx)
        summary["tokenizer"]["rows"] = report
        if self.scoring:
            scores[self.method] = self._score(model, new, held_out)
        summary["zero_shot"] = _table(scores, "parent")
        if self.scoring:  # best first, by bits per byte on the target domain
            target = self.scoring.target
            summary["zero_shot_ranking"] = sorted(
                (n for n in scores if n != "parent"),
                key=lambda n: summary["zero_shot"][n][target]["bits_per_byte"],
            )
        if self.heal:
            rows = None if self.heal.rows == "all" else _new_rows(old, new)
            summary["heal"] = heal_embeddings(
                model, new, texts, tokens=self.heal.tokens, new_rows=rows,
                seq_len=self.heal.seq_len, batch_size=self.heal.batch_size, lr=self.heal.lr,
                seed=ctx.seed,
            )  # fmt: skip
            summary["heal"]["rows"] = self.heal.rows
            if self.scoring:
                after = {"parent": scores["parent"], self.method: scores[self.method]}
                after[f"{self.method}+heal"] = self._score(model, new, held_out)
                summary["healed"] = _table(after, "parent")
        model.eval()
        return replace(bundle, model=model, tokenizer=new)

    # --- the target tokenizer --------------------------------------------------------------

    def _target_tokenizer(self, texts, old, held_out, ctx) -> tuple[PreTrainedTokenizerBase, dict]:
        """The tokenizer to transplant, and compression of old / BPE / Supertokens on held-out
        text (both variants are trained at the same vocabulary size to compare them)."""
        variants = {"old": old}
        if self.tokenizer is not None:
            variants["new"] = chosen = _load_tokenizer(self.tokenizer)
        else:
            for name, sup in (("bpe", False), ("supertokens", True)):
                ctx.log.info("training %s tokenizer (%d tokens)", name, self.vocab_size)
                variants[name] = train_bpe(
                    texts, self.vocab_size, source_tokenizer=old, supertokens=sup,
                    chunking=self.chunking, max_words=self.max_words,
                    min_frequency=self.min_frequency, seed=ctx.seed,
                )  # fmt: skip
            chosen = variants[self._variant()]
        compression = {}
        for task, docs in held_out.items():
            stats = {name: compression_stats(tok, docs) for name, tok in variants.items()}
            row = {name: _round(s) for name, s in stats.items()}
            if "supertokens" in stats:
                row["supertokens_over_bpe_bytes_per_token"] = round(
                    stats["supertokens"]["bytes_per_token"] / stats["bpe"]["bytes_per_token"], 4
                )
            chosen_stats = next(stats[n] for n in ("new", self._variant()) if n in stats)
            row["new_over_old_tokens"] = round(chosen_stats["tokens"] / stats["old"]["tokens"], 4)
            compression[task] = row
        return chosen, compression

    def _corpus_texts(self) -> list[str]:
        from lmpress.data import corpus as corpora
        from lmpress.evaluate.offline_tasks import train_documents

        c = self.corpus
        if c.source in ("offline_code", "offline"):
            docs = train_documents(code_only=c.source == "offline_code")
        elif c.source == "files":
            docs = corpora.read_text_files(c.files, field="corpus.files", text_key=c.text_key)
        else:
            docs = corpora.hf_dataset_documents(
                c.dataset, c.dataset_config, c.split, c.text_key, c.max_documents
            )
        texts = [d.text for d in docs[: c.max_documents] if d.text.strip()]
        if not texts:
            raise LmpressError("corpus: the corpus is empty")
        return texts

    def _variant(self) -> str:
        return "supertokens" if self.supertokens else "bpe"

    def _describe(self, new, old) -> dict:
        return {
            "variant": "loaded" if self.tokenizer else self._variant(),
            "vocab_size_old": len(old),
            "vocab_size_new": len(new),
            "chunking": self.chunking if self.supertokens and not self.tokenizer else None,
        }

    # --- transplanting and scoring ---------------------------------------------------------

    def _transplant(self, model, old, new, method: str, report: dict, ctx) -> None:
        ctx.log.info("transplanting embeddings (%s)", method)
        space = None
        if method == "tokenadapt":
            if self.aux_space == "input_embeddings":
                space = InputEmbeddingSpace(model, old)
            else:
                space = HiddenStateSpace(model, old, layer=self.aux_layer)
        transplant_embeddings(
            model, old, new, method=method, temperature=self.temperature,
            global_weight=self.global_weight, top_k=self.top_k, threshold=self.threshold,
            aux_space=space, seed=ctx.seed, report=report, progress=False,
        )  # fmt: skip

    def _score(self, model, tokenizer, held_out: dict[str, list[str]]) -> dict:
        s = self.scoring
        return {
            task: tok_eval.rolling_scores(
                model, tokenizer, texts, max_length=s.max_length, batch_size=s.batch_size
            )
            for task, texts in held_out.items()
        }


def _load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    if not Path(path).expanduser().is_dir():
        raise LmpressError(f"tokenizer: directory not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(Path(path).expanduser())
    except (OSError, ValueError) as e:
        raise LmpressError(f"tokenizer: cannot load {path}: {str(e).splitlines()[0]}") from e


def _task_texts(task: str, scoring: Scoring) -> list[str]:
    from lmpress.evaluate.offline_tasks import load_task_docs

    return [d["text"] for d in load_task_docs(task)][: scoring.limit]


def _new_rows(old, new) -> list[int]:
    """Ids of the new vocabulary that the transplant estimated (not copied)."""
    copies = shared_tokens(token_keys(old), token_keys(new))
    return [i for i in range(len(new)) if i not in copies]


def _table(scores: dict[str, dict], base: str) -> dict:
    """Per model and task: bits per byte, its ratio to the parent, and the paper's PPL ratio."""
    out = {}
    for name, by_task in scores.items():
        out[name] = {}
        for task, per_text in by_task.items():
            bpb = tok_eval.bits_per_byte(per_text)
            row = {"bits_per_byte": round(bpb, 4)}
            if name != base:
                parent = scores[base][task]
                row["bpb_ratio"] = round(bpb / tok_eval.bits_per_byte(parent), 4)
                row["ppl_ratio"] = {
                    k: round(v, 4) for k, v in tok_eval.perplexity_ratio(per_text, parent).items()
                }
            out[name][task] = row
    return out


def _round(stats: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in stats.items()}
