"""TokenAdapt transplantation: shared rows exact, the hybrid as the paper computes it, reload."""

import math
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt_oss
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lmpress.errors import LmpressError
from lmpress.tokenizers.train import train_bpe
from lmpress.tokenizers.transplant import (
    InputEmbeddingSpace,
    shared_tokens,
    token_keys,
    transplant_embeddings,
)

EOS = "<|endoftext|>"
BYTE = {b: c for b, c in bytes_to_unicode().items()}  # byte -> byte-level character
TAU, W_GLOBAL = 0.3, 0.3
HELLO_MERGES = [("h", "e"), ("l", "o"), ("l", "lo")]  # "hello" -> he + llo


@pytest.fixture(scope="module")
def texts() -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [f.read_text(encoding="utf-8") for f in files[:40]]


@pytest.fixture(scope="module")
def old_tok(texts, tokenizer):
    return train_bpe(texts[:15], 400, source_tokenizer=tokenizer)


@pytest.fixture(scope="module")
def new_tok(texts, old_tok):
    return train_bpe(texts[15:30], 600, source_tokenizer=old_tok, supertokens=True)


def tiny_llama(tok, seed: int = 0) -> LlamaForCausalLM:
    """An untied model (separate lm_head)."""
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def build(kind: str, tok):
    return tiny_gpt_oss(tok) if kind == "tied" else tiny_llama(tok)


def embeddings(model) -> tuple[torch.Tensor, torch.Tensor]:
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return inp.detach().clone(), out.detach().clone()


@pytest.mark.parametrize("kind", ["tied", "untied"])
@pytest.mark.parametrize("method", ["tokenadapt", "mean", "random"])
def test_shared_tokens_keep_their_rows_bit_for_bit(kind, method, old_tok, new_tok):
    model = build(kind, old_tok)
    old_in, old_out = embeddings(model)
    report = {}
    transplant_embeddings(model, old_tok, new_tok, method=method, report=report)
    copies = shared_tokens(token_keys(old_tok), token_keys(new_tok))
    new_ids, old_ids = map(list, zip(*copies.items(), strict=True))
    new_in, new_out = embeddings(model)
    assert new_in.shape == new_out.shape == (len(new_tok), 32)
    assert torch.equal(new_in[new_ids], old_in[old_ids])
    assert torch.equal(new_out[new_ids], old_out[old_ids])
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (kind == "tied")
    assert report["shared"] == len(copies) > 100 and report["unique"] == len(new_tok) - len(copies)
    assert model.config.vocab_size == len(new_tok)
    assert model.config.eos_token_id == new_tok.eos_token_id
    assert model.config.pad_token_id == new_tok.pad_token_id


def test_every_unique_token_gets_an_estimate(old_tok, new_tok):
    report = {}
    transplant_embeddings(tiny_llama(old_tok), old_tok, new_tok, report=report)
    assert report["random"] == 0
    assert report["hybrid"] == report["unique"]  # every text has a decomposition and neighbours


def test_byte_level_and_sentencepiece_forms_of_a_token_are_shared():
    byte_level = _toy_tokenizer(extra=["Ġthe"])
    sentencepiece = _toy_tokenizer(extra=["▁the"], metaspace=True)
    new_id = sentencepiece.convert_tokens_to_ids("▁the")
    old_id = byte_level.convert_tokens_to_ids("Ġthe")
    assert shared_tokens(token_keys(byte_level), token_keys(sentencepiece))[new_id] == old_id


def test_a_token_spelt_by_one_old_token_gets_its_row_from_the_local_estimate(old_tok):
    """The old tokenizer's special "<|end|>" is plain (non-special) text in the new one: not
    shared, but its decomposition is that one old token, so local = that row exactly."""
    new = _toy_tokenizer(plain_added=["<|end|>"])
    model = tiny_llama(old_tok)
    old_in, old_out = embeddings(model)
    report = {}
    transplant_embeddings(model, old_tok, new, global_weight=0.0, report=report)
    assert report["local"] == report["unique"] and report["hybrid"] == 0
    new_in, new_out = embeddings(model)
    new_id, old_id = new.convert_tokens_to_ids("<|end|>"), old_tok.convert_tokens_to_ids("<|end|>")
    assert new_id not in shared_tokens(token_keys(old_tok), token_keys(new))
    assert torch.equal(new_in[new_id], old_in[old_id])
    assert torch.equal(new_out[new_id], old_out[old_id])


def test_hybrid_equals_a_hand_computation():
    """Old vocab spells "hello" as he + llo; the new vocab has "hello" as one token."""
    old = _toy_tokenizer(HELLO_MERGES)
    new = _toy_tokenizer([*HELLO_MERGES, ("he", "llo"), (BYTE[0xE6], BYTE[0x97])])
    model = tiny_llama(old)
    old_in, old_out = embeddings(model)
    phi = {
        "hello": [1.0, 0, 0],
        "he": [0.8, 0.6, 0],
        "llo": [0.6, 0.8, 0],
        "h": [0.5, 0, 0.75**0.5],
    }

    def aux(texts):  # every other text is orthogonal to "hello"
        return torch.tensor([phi.get(t, [0.0, 0.0, 1.0]) for t in texts])

    transplant_embeddings(model, old, new, temperature=TAU, global_weight=W_GLOBAL, aux_space=aux)
    new_in, new_out = embeddings(model)
    he, llo, h = (old.convert_tokens_to_ids(t) for t in ("he", "llo", "h"))
    # local: c_j = (softmax(cos) + len share) / 2, weights softmax(c / tau)
    sem = _softmax([0.8, 0.6])
    c = [(sem[0] + 2 / 5) / 2, (sem[1] + 3 / 5) / 2]
    local = _softmax([x / TAU for x in c])
    glob = _softmax([0.8 / TAU, 0.6 / TAU, 0.5 / TAU])  # top-3 neighbours: he, llo, h
    for new_rows, old_rows in ((new_in, old_in), (new_out, old_out)):
        e_local = local[0] * old_rows[he] + local[1] * old_rows[llo]
        e_global = glob[0] * old_rows[he] + glob[1] * old_rows[llo] + glob[2] * old_rows[h]
        expected = (1 - W_GLOBAL) * e_local + W_GLOBAL * e_global
        torch.testing.assert_close(new_rows[new.convert_tokens_to_ids("hello")], expected)
        # a partial UTF-8 token has no text to embed: the mean of its byte pieces
        pieces = [old.convert_tokens_to_ids(BYTE[b]) for b in (0xE6, 0x97)]
        partial = new.convert_tokens_to_ids(BYTE[0xE6] + BYTE[0x97])
        torch.testing.assert_close(new_rows[partial], old_rows[pieces].mean(0))


def test_mean_baseline_and_random_baseline():
    old = _toy_tokenizer(HELLO_MERGES)
    new = _toy_tokenizer([*HELLO_MERGES, ("he", "llo")])
    hello = new.convert_tokens_to_ids("hello")
    he, llo = old.convert_tokens_to_ids("he"), old.convert_tokens_to_ids("llo")
    model = tiny_llama(old)
    old_in, _ = embeddings(model)
    new_in, _ = embeddings(transplant_embeddings(model, old, new, method="mean"))
    torch.testing.assert_close(new_in[hello], (old_in[he] + old_in[llo]) / 2)
    rows = [embeddings(transplant_embeddings(tiny_llama(old), old, new, method="random", seed=s))[0]
            for s in (0, 0, 1)]  # fmt: skip
    assert torch.equal(rows[0][hello], rows[1][hello])
    assert not torch.equal(rows[0][hello], rows[2][hello])


def test_input_embedding_space_runs_end_to_end(old_tok, new_tok):
    model = tiny_gpt_oss(old_tok)
    report = {}
    transplant_embeddings(
        model, old_tok, new_tok, aux_space=InputEmbeddingSpace(model, old_tok), report=report
    )
    assert report["random"] == 0 and model.get_input_embeddings().weight.isfinite().all()


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_saved_model_and_tokenizer_reload_with_same_ids_and_logits(kind, old_tok, new_tok, texts,
                                                                   tmp_path):  # fmt: skip
    model = transplant_embeddings(build(kind, old_tok), old_tok, new_tok)
    model.save_pretrained(tmp_path)
    new_tok.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    text = texts[35][:600]
    ids = new_tok(text, return_tensors="pt").input_ids
    assert torch.equal(loaded_tok(text, return_tensors="pt").input_ids, ids)
    assert len(loaded_tok) == len(new_tok)
    with torch.no_grad():
        delta = (model(ids).logits - loaded(ids).logits).abs().max().item()
    assert delta <= 1e-5


def test_bad_inputs_raise_a_one_line_error(old_tok, new_tok):
    model = tiny_llama(old_tok)
    no_eos = PreTrainedTokenizerFast(tokenizer_object=new_tok.backend_tokenizer)
    empty = Tokenizer(models.BPE())
    cases = [
        ({"method": "fvt"}, new_tok, r"transplant_tokenizer\.method: 'fvt' is not one of"),
        ({"temperature": 0}, new_tok, r"transplant_tokenizer\.temperature: must be > 0"),
        ({"global_weight": 2}, new_tok, r"transplant_tokenizer\.global_weight"),
        ({"top_k": 0}, new_tok, r"transplant_tokenizer\.top_k"),
        ({}, no_eos, r"transplant_tokenizer\.tokenizer: the new tokenizer has no eos_token"),
        ({}, PreTrainedTokenizerFast(tokenizer_object=empty), r"vocabulary is empty"),
    ]
    for kwargs, new, message in cases:
        with pytest.raises(LmpressError, match=message):
            transplant_embeddings(model, old_tok, new, **kwargs)
    with pytest.raises(LmpressError, match="not this model's tokenizer"):
        transplant_embeddings(tiny_llama(_toy_tokenizer()), old_tok, new_tok)
    assert model.get_input_embeddings().weight.shape[0] == len(old_tok)  # untouched


def _softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def _toy_tokenizer(
    merges: list[tuple[str, str]] = (),
    extra: list[str] = (),
    metaspace: bool = False,
    plain_added: list[str] = (),
) -> PreTrainedTokenizerFast:
    """Eos (id 0), the byte alphabet, then `merges`' results and `extra` tokens."""
    alphabet = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
    vocab = {EOS: 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    for token in [a + b for a, b in merges] + list(extra):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    if metaspace:
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain_added])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS)
