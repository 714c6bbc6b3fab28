"""Give a model a new tokenizer: TokenAdapt initialisation of the new embedding rows.

TokenAdapt (arXiv 2505.09738, code Tinycompany-AI/tokenadapt, `src/heuristics.py`):
- a token in both vocabularies keeps its input and output rows bit-for-bit;
- each other token t with text s gets (1-w)*local + w*global, where
  local  = sum_j softmax_j(c_j / tau) E[id_j] over s's decomposition by the old tokenizer,
           c_j = (softmax_j(cos(phi(s), phi(s_j))) + len(s_j)/len(s)) / 2;
  global = sum_l softmax_l(sim_l / tau) E[id_l] over the top-k old tokens nearest to s in an
           auxiliary space phi (weights below `threshold` dropped after the softmax);
  when only one estimate exists it is used alone; when neither, the row is random.
- random rows are N(mean, std) of the old matrix (scalar statistics, as the paper's code).
The same weights build the input and the output matrix.

The paper's phi is a hub text-embedding model; lmpress must work offline, so the default phi is
the parent itself: the mean of its hidden states at a middle layer over the text's tokens
(`HiddenStateSpace`). Any `Callable[[list[str]], Tensor]` can replace it.

Tokens are matched by their bytes, not their vocabulary strings, so a byte-level "Ġthe" and a
SentencePiece "▁the" are the same token; special tokens match only special tokens (a control
token "<|end|>" is not the text "<|end|>").
Baselines: "mean" (mean of the decomposition's rows, FVT/ReTok) and "random".
"""

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lmpress.errors import LmpressError

logger = logging.getLogger(__name__)

FIELD = "transplant_tokenizer"
METHODS = ("tokenadapt", "mean", "random")
SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token")
REQUIRED_ROLES = ("eos_token", "pad_token")  # a model that had these cannot lose them
PROGRESS_MIN_TOKENS = 2000
BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

AuxSpace = Callable[[list[str]], torch.Tensor]  # texts -> [len(texts), d_aux]
TokenKey = tuple[bool, bytes]  # (is a special token, its bytes)


@dataclass
class Mix:
    """A new row as a convex combination of old rows."""

    ids: list[int]
    weights: list[float]


def transplant_embeddings(
    model: PreTrainedModel,
    old_tokenizer: PreTrainedTokenizerBase,
    new_tokenizer: PreTrainedTokenizerBase,
    *,
    method: str = "tokenadapt",
    temperature: float = 0.3,
    global_weight: float = 0.3,
    top_k: int = 3,
    threshold: float = 0.0,
    aux_space: AuxSpace | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool | None = None,
    report: dict | None = None,
) -> PreTrainedModel:
    """Resize `model`'s input and output embeddings to `new_tokenizer` and initialise them.

    Works in place and returns the model. Tied models stay tied; untied ones get the same mix
    weights on both matrices (and on an lm_head bias). The config's vocab_size and bos/eos/pad
    ids follow the new tokenizer. `report`, if given, receives how many rows each rule filled.
    """
    _check_options(method, temperature, global_weight, top_k, batch_size)
    _check_tokenizers(model, old_tokenizer, new_tokenizer)
    old_keys, new_keys = token_keys(old_tokenizer), token_keys(new_tokenizer)
    copies = shared_tokens(old_keys, new_keys)
    unique = [i for i in range(len(new_keys)) if i not in copies]
    show = len(unique) >= PROGRESS_MIN_TOKENS if progress is None else progress
    counts = {"shared": len(copies), "unique": len(unique)}
    if method == "random":
        mixes: dict[int, Mix] = {}
    else:
        pieces = decompose([new_keys[i] for i in unique], old_tokenizer, old_keys)
        pieces_of = dict(zip(unique, pieces, strict=True))
        if method == "mean":
            mixes = {i: mean_mix(p) for i, p in pieces_of.items() if p}
        else:
            space = aux_space or HiddenStateSpace(model, old_tokenizer)
            mixes = tokenadapt_mixes(
                pieces_of, new_keys, old_keys, space,
                temperature=temperature, global_weight=global_weight, top_k=top_k,
                threshold=threshold, batch_size=batch_size, progress=show, counts=counts,
            )  # fmt: skip
    counts["random"] = len(unique) - len(mixes)
    _install(model, len(new_keys), copies, mixes, seed)
    _update_config(model, new_tokenizer, copies)
    logger.info("transplanted embeddings (%s): %s", method, counts)
    if report is not None:
        report.update(counts)
    return model


# --- matching tokens by bytes -------------------------------------------------------------


def token_keys(tokenizer: PreTrainedTokenizerBase) -> list[TokenKey]:
    """Per id, what the token *is*: its raw bytes, and whether it is a special token."""
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    to_bytes = _vocab_decoder(tokenizer)
    keys = []
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in added:
            keys.append((added[i].special, added[i].content.encode("utf-8")))
        else:
            keys.append((False, to_bytes(tok or "")))
    return keys


def _vocab_decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], bytes]:
    """How a vocabulary string maps to bytes, read off the tokenizer's decoder."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    kinds = _component_kinds(spec.get("decoder")) | _component_kinds(spec.get("pre_tokenizer"))
    if "ByteLevel" in kinds:
        table = {c: b for b, c in bytes_to_unicode().items()}

        def byte_level(tok: str) -> bytes:
            if all(c in table for c in tok):
                return bytes(table[c] for c in tok)
            return tok.encode("utf-8")

        return byte_level

    def sentencepiece(tok: str) -> bytes:
        if "ByteFallback" in kinds and (m := BYTE_FALLBACK.match(tok)):
            return bytes([int(m.group(1), 16)])
        return tok.replace("\u2581", " ").encode("utf-8")

    return sentencepiece


def _component_kinds(node: dict | None) -> set[str]:
    """The types in a decoder or pre-tokenizer, looking inside Sequences."""
    if not node:
        return set()
    kinds = {node.get("type", "")}
    for child in (node.get("decoders") or []) + (node.get("pretokenizers") or []):
        kinds |= _component_kinds(child)
    return kinds


def shared_tokens(old_keys: Sequence[TokenKey], new_keys: Sequence[TokenKey]) -> dict[int, int]:
    """new id -> old id for tokens present in both vocabularies (first old id on duplicates)."""
    old_index: dict[TokenKey, int] = {}
    for i, key in enumerate(old_keys):
        old_index.setdefault(key, i)
    return {i: old_index[k] for i, k in enumerate(new_keys) if k in old_index and k[1]}


def _text(key: TokenKey) -> str | None:
    """The token's text, or None for a partial UTF-8 sequence (it has no text to embed)."""
    try:
        return key[1].decode("utf-8") or None
    except UnicodeDecodeError:
        return None


# --- decomposition by the old tokenizer ---------------------------------------------------


def decompose(
    keys: Sequence[TokenKey], old_tokenizer: PreTrainedTokenizerBase, old_keys: Sequence[TokenKey]
) -> list[list[int]]:
    """Old ids spelling each token's bytes ([] when the old vocabulary cannot spell them).

    The text is encoded by the old tokenizer, as TokenAdapt does; partial UTF-8 tokens, and
    texts the old tokenizer spells differently (e.g. a SentencePiece prefix space), fall back
    to a greedy longest match over the old tokens' bytes.
    """
    texts = [_text(k) or "" for k in keys]
    encoded = old_tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    by_bytes = {k[1]: i for i, k in reversed(list(enumerate(old_keys))) if not k[0] and k[1]}
    longest = max((len(b) for b in by_bytes), default=0)
    out = []
    for key, ids in zip(keys, encoded, strict=True):
        if ids and b"".join(old_keys[i][1] for i in ids) == key[1]:
            out.append(list(ids))
        else:
            out.append(_greedy_bytes(key[1], by_bytes, longest))
    return out


def _greedy_bytes(data: bytes, by_bytes: dict[bytes, int], longest: int) -> list[int]:
    ids, pos = [], 0
    while pos < len(data):
        for size in range(min(longest, len(data) - pos), 0, -1):
            if (i := by_bytes.get(data[pos : pos + size])) is not None:
                ids.append(i)
                pos += size
                break
        else:
            return []
    return ids


# --- the heuristics -------------------------------------------------------------------------


def mean_mix(pieces: list[int]) -> Mix:
    """FVT / ReTok: the plain mean of the decomposition's rows (repeats count)."""
    return Mix(list(pieces), [1.0 / len(pieces)] * len(pieces))


def local_weights(
    phi_token: torch.Tensor, phi_pieces: torch.Tensor, piece_lens: torch.Tensor, text_len: int,
    temperature: float,
) -> torch.Tensor:  # fmt: skip
    """TokenAdapt's local weights w_j = softmax_j(c_j / tau), c_j = (softmax(cos) + len share)/2.

    phi_token: [d] and phi_pieces: [m, d], both L2-normalised; piece_lens: [m] characters.
    """
    semantic = torch.softmax(phi_pieces @ phi_token, dim=0)
    length_share = piece_lens / max(1, text_len)
    return torch.softmax((semantic + length_share) / 2 / temperature, dim=0)


def global_weights(sims: torch.Tensor, temperature: float, threshold: float) -> torch.Tensor | None:
    """TokenAdapt's global weights over the top-k neighbours: softmax(sim / tau), then the
    neighbours below `threshold` are dropped and the rest renormalised (None if none remain)."""
    weights = torch.softmax(sims / temperature, dim=0) * (sims >= threshold)
    total = weights.sum()
    return weights / total if total > 0 else None


def tokenadapt_mixes(
    pieces_of: dict[int, list[int]],
    new_keys: Sequence[TokenKey],
    old_keys: Sequence[TokenKey],
    space: AuxSpace,
    *,
    temperature: float,
    global_weight: float,
    top_k: int,
    threshold: float,
    batch_size: int,
    progress: bool,
    counts: dict,
) -> dict[int, Mix]:
    """The hybrid (1-w)*local + w*global for every new token, as mixes of old ids."""
    old_texts = {i: t for i, k in enumerate(old_keys) if (t := _text(k))}
    old_ids = list(old_texts)
    old_phi = _embed(space, [old_texts[i] for i in old_ids], batch_size, progress, "aux: old vocab")
    old_row = {i: r for r, i in enumerate(old_ids)}
    index = [r for r, i in enumerate(old_ids) if not old_keys[i][0]]  # no specials as neighbours
    new_ids = [i for i in pieces_of if _text(new_keys[i])]
    new_texts = [_text(new_keys[i]) for i in new_ids]
    new_phi = _embed(space, new_texts, batch_size, progress, "aux: new tokens")
    neighbours = _top_k(new_phi, old_phi[index], top_k, batch_size)
    mixes, tally = {}, {"hybrid": 0, "local": 0, "global": 0, "mean_fallback": 0}
    pairs = tqdm(
        list(zip(new_ids, new_texts, strict=True)), desc="tokenadapt", disable=not progress
    )
    for n, (i, text) in enumerate(pairs):
        pieces = [p for p in pieces_of[i] if p in old_row]  # those with an aux embedding
        local = None
        if pieces:
            lens = torch.tensor([len(old_texts[p]) for p in pieces], dtype=torch.float32)
            phi = old_phi[[old_row[p] for p in pieces]]  # [m, d_aux]
            local = Mix(
                pieces, local_weights(new_phi[n], phi, lens, len(text), temperature).tolist()
            )
        sims, cols = neighbours[0][n], neighbours[1][n]
        w = global_weights(sims, temperature, threshold) if len(sims) else None
        glob = None if w is None else Mix([old_ids[index[c]] for c in cols.tolist()], w.tolist())
        mix, kind = _hybrid(local, glob, global_weight)
        if mix is not None:
            mixes[i] = mix
            tally[kind] += 1
    for i, pieces in pieces_of.items():  # no text to embed (partial UTF-8) or no estimate
        if i not in mixes and pieces:
            mixes[i] = mean_mix(pieces)
            tally["mean_fallback"] += 1
    counts.update(tally)
    return mixes


def _hybrid(local: Mix | None, glob: Mix | None, global_weight: float) -> tuple[Mix | None, str]:
    """Eq. 5: (1-w)*local + w*global when both exist, else whichever exists (w = 0 or 1
    is one estimate alone, counted as such)."""
    if glob is None or (local is not None and global_weight == 0):
        return local, "local"
    if local is None or global_weight == 1:
        return glob, "global"
    weights = [(1 - global_weight) * w for w in local.weights]
    weights += [global_weight * w for w in glob.weights]
    return Mix(local.ids + glob.ids, weights), "hybrid"


def _embed(space: AuxSpace, texts: list[str], batch_size: int, progress: bool, desc: str):
    """L2-normalised auxiliary embeddings [len(texts), d_aux], computed in batches of texts
    of similar length (less padding), returned in the order of `texts`."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress):
        batch = [texts[i] for i in order[start : start + batch_size]]
        parts.append(torch.as_tensor(space(batch)).detach().float().cpu())
    if not parts:
        return torch.zeros(0, 1)
    phi = torch.empty(len(texts), parts[0].shape[-1])
    phi[order] = torch.cat(parts)
    return torch.nn.functional.normalize(phi, dim=-1)


def _top_k(queries: torch.Tensor, keys: torch.Tensor, k: int, batch_size: int):
    """Cosine top-k of each query among keys (both normalised): ([n, k] sims, [n, k] cols)."""
    k = min(k, len(keys))
    if k == 0 or len(queries) == 0:
        empty = torch.zeros(len(queries), 0)
        return empty, empty.long()
    sims, cols = [], []
    for start in range(0, len(queries), batch_size):
        s, c = (queries[start : start + batch_size] @ keys.T).topk(k, dim=-1)  # [b, k]
        sims.append(s)
        cols.append(c)
    return torch.cat(sims), torch.cat(cols)


# --- auxiliary spaces ----------------------------------------------------------------------


class HiddenStateSpace:
    """phi(text) = mean over the text's tokens of the parent's hidden state at `layer`.

    The default offline stand-in for TokenAdapt's text-embedding model. A middle layer by
    default: it is more semantic than the last (which predicts the next token). The text is put
    after the tokenizer's bos (or eos, a document boundary) and only the text is pooled, since
    the first position of a causal LM carries an outlier "sink" state that would make every
    single-token text look alike.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layer=None):
        self.model, self.tokenizer = model, tokenizer
        n_layers = model.config.get_text_config().num_hidden_layers
        self.layer = n_layers // 2 if layer is None else layer  # hidden_states[0] = embeddings
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None
        start = tokenizer.eos_token_id if start is None else start
        self.prefix = [] if start is None else [start]

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            return self._pooled(texts)
        finally:
            self.model.train(was_training)

    def _pooled(self, texts: list[str]) -> torch.Tensor:
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        width = len(self.prefix) + max(max(len(ids) for ids in encoded), 1)
        device = next(self.model.parameters()).device
        input_ids = torch.zeros(len(texts), width, dtype=torch.long)
        mask = torch.zeros(len(texts), width, dtype=torch.long)  # right padding
        pool = torch.zeros(len(texts), width)
        for row, ids in enumerate(encoded):
            seq = self.prefix + list(ids)
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            pool[row, len(self.prefix) : len(seq)] = 1
        out = self.model.base_model(
            input_ids=input_ids.to(device), attention_mask=mask.to(device),
            output_hidden_states=True,
        )  # fmt: skip
        hidden = out.hidden_states[self.layer].float().cpu()  # [batch, width, d]
        return (hidden * pool[..., None]).sum(1) / pool.sum(1, keepdim=True).clamp(min=1)


class InputEmbeddingSpace:
    """phi(text) = mean of the parent's input embeddings over the text's old tokens.

    A cheap space with no forward pass (for very large vocabularies); the local heuristic then
    compares a token with its pieces inside the embedding matrix itself.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.weight = model.get_input_embeddings().weight.detach().float().cpu()
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> torch.Tensor:
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return torch.stack([self.weight[ids].mean(0) for ids in encoded])


# --- writing the new matrices into the model ------------------------------------------------


def _install(model: PreTrainedModel, n_new: int, copies: dict[int, int], mixes, seed: int):
    """Resize the model to n_new rows and fill input, output (if untied) and lm_head bias."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is None or out.weight is inp.weight
    gen = torch.Generator().manual_seed(seed)
    new_in = _build_rows(inp.weight.detach(), n_new, copies, mixes, gen)
    new_out = None if tied else _build_rows(out.weight.detach(), n_new, copies, mixes, gen)
    bias = None if out is None else getattr(out, "bias", None)
    if bias is not None:
        bias = _build_rows(bias.detach()[:, None], n_new, copies, mixes, gen)[:, 0]
    model.resize_token_embeddings(n_new, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new_in)
        if new_out is not None:
            model.get_output_embeddings().weight.copy_(new_out)
        if bias is not None:
            model.get_output_embeddings().bias.copy_(bias)
    if tied:
        model.tie_weights()
        out = model.get_output_embeddings()
        if out is not None and out.weight is not model.get_input_embeddings().weight:
            with torch.no_grad():  # shared before, but the config does not say tied
                out.weight.copy_(new_in)


def _build_rows(
    old: torch.Tensor, n_new: int, copies: dict[int, int], mixes: dict[int, Mix], gen
) -> torch.Tensor:
    """[n_new, d] in old's dtype: copied rows exact, mixed rows in fp32, the rest random."""
    old32 = old.float().cpu()
    mean, std = old32.mean().item(), old32.std().item()
    rows = torch.empty(n_new, old.shape[1]).normal_(mean, std, generator=gen).to(old.dtype)
    if mixes:
        new_ids = list(mixes)
        coords = [(r, c, w) for r, i in enumerate(new_ids) for c, w in _pairs(mixes[i])]
        r, c, w = (list(x) for x in zip(*coords, strict=True))
        matrix = torch.sparse_coo_tensor(
            [r, c], w, (len(new_ids), len(old32)), check_invariants=True
        )
        rows[new_ids] = torch.sparse.mm(matrix, old32).to(old.dtype)  # [n_mixed, d]
    if copies:
        new_ids, old_ids = (list(x) for x in zip(*copies.items(), strict=True))
        rows[new_ids] = old.cpu()[old_ids]  # bit-for-bit
    return rows.to(old.device)


def _pairs(mix: Mix):
    return zip(mix.ids, mix.weights, strict=True)


# --- checks and config -----------------------------------------------------------------------


def _check_options(method, temperature, global_weight, top_k, batch_size) -> None:
    if method not in METHODS:
        raise LmpressError(f"{FIELD}.method: {method!r} is not one of {', '.join(METHODS)}")
    if not temperature > 0:
        raise LmpressError(f"{FIELD}.temperature: must be > 0, got {temperature}")
    if not 0 <= global_weight <= 1:
        raise LmpressError(f"{FIELD}.global_weight: must be in [0, 1], got {global_weight}")
    if top_k < 1:
        raise LmpressError(f"{FIELD}.top_k: must be at least 1, got {top_k}")
    if batch_size < 1:
        raise LmpressError(f"{FIELD}.batch_size: must be at least 1, got {batch_size}")


def _check_tokenizers(model, old_tokenizer, new_tokenizer) -> None:
    if len(new_tokenizer) == 0:
        raise LmpressError(f"{FIELD}.tokenizer: the new tokenizer's vocabulary is empty")
    rows = model.get_input_embeddings().weight.shape[0]
    if len(old_tokenizer) > rows:
        raise LmpressError(
            f"{FIELD}: the old tokenizer has {len(old_tokenizer)} tokens but the model's "
            f"embedding has {rows} rows; it is not this model's tokenizer"
        )
    for role in REQUIRED_ROLES:
        if getattr(old_tokenizer, role) is not None and getattr(new_tokenizer, role) is None:
            raise LmpressError(
                f"{FIELD}.tokenizer: the new tokenizer has no {role} and the model needs one "
                f"(the old tokenizer's is {getattr(old_tokenizer, role)!r})"
            )
    template = new_tokenizer.chat_template
    if isinstance(template, str):  # a control token the chat format writes must stay one
        specials = {t.content for t in new_tokenizer.added_tokens_decoder.values() if t.special}
        used = [t for t in old_tokenizer.all_special_tokens if t in template]
        if missing := [t for t in used if t not in specials]:
            raise LmpressError(
                f"{FIELD}.tokenizer: the chat template uses {', '.join(missing)}, a special "
                "token of the old tokenizer that the new one lacks"
            )


def _update_config(model: PreTrainedModel, new_tokenizer, copies: dict[int, int]) -> None:
    """bos/eos/pad ids in the config and generation config, moved to the new vocabulary."""
    old_to_new = {old: new for new, old in copies.items()}
    configs = [model.config, model.config.get_text_config()]
    if getattr(model, "generation_config", None) is not None:
        configs.append(model.generation_config)
    for cfg in configs:
        for role in SPECIAL_ROLES:
            name = f"{role}_id"
            old = getattr(cfg, name, None)
            olds = old if isinstance(old, list) else [] if old is None else [old]
            ids = [old_to_new[i] for i in olds if i in old_to_new]
            if not ids and getattr(new_tokenizer, name) is not None:
                ids = [getattr(new_tokenizer, name)]
            setattr(cfg, name, ids if isinstance(old, list) else (ids[0] if ids else None))
