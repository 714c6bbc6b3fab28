"""Training target tokenizers: byte-level BPE and Supertokens on standard-library source."""

import random
import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lmpress.errors import LmpressError
from lmpress.tokenizers.train import BYTE_ALPHABET, compression_stats, train_bpe, word_chunks

TRAIN_CHARS = 1_000_000
HELD_OUT_FILES = 40
VOCAB = 8000  # small next to real vocabularies (128k-200k), where Supertokens gain more
MIN_SUPERTOKEN_GAIN = 1.15  # measured 1.18 here (seeds 0-2: 1.176-1.182)
# The 25 % the demo shows needs 16k tokens and 10 MB of text (tests/test_transplant_stage.py,
# slow): chars 1.26x, words 1.35x there.
ODD_TEXTS = [
    "naïve café — 日本語のテキスト 🙂\n",
    "\t\tmixed   whitespace \r\n\n\n  trailing  ",
    "x" * 300,
    "<|endoftext|> inside text <|start|>",
]


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    """Top-level stdlib modules: even files for training, odd ones held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(encoding="utf-8") for f in files]
    train, size = [], 0
    for text in texts[::2]:
        if size >= TRAIN_CHARS:
            break
        train.append(text)
        size += len(text)
    return train, texts[1::2][:HELD_OUT_FILES]


@pytest.fixture(scope="module")
def plain(corpus, source):
    return train_bpe(corpus[0], VOCAB, source_tokenizer=source)


@pytest.fixture(scope="module")
def supertokens(corpus, source):
    return train_bpe(corpus[0], VOCAB, source_tokenizer=source, supertokens=True)


@pytest.fixture(scope="module")
def words(corpus, source):
    return train_bpe(corpus[0], VOCAB, source_tokenizer=source, supertokens=True, chunking="words")


@pytest.fixture(scope="module")
def source(tokenizer):
    """The demo parent's tokenizer: eos = pad, chat special tokens, a chat template."""
    return tokenizer


def test_supertokens_compress_more_at_the_same_vocab_size(corpus, plain, supertokens):
    held_out = corpus[1]
    base = compression_stats(plain, held_out)
    sup = compression_stats(supertokens, held_out)
    assert len(plain) == len(supertokens) == VOCAB
    assert sup["bytes_per_token"] / base["bytes_per_token"] > MIN_SUPERTOKEN_GAIN
    assert sup["tokens_per_word"] < base["tokens_per_word"]


def test_word_chunks_compress_more_than_char_chunks(corpus, plain, supertokens, words):
    held_out = corpus[1]
    base, chars, by_words = (compression_stats(t, held_out) for t in (plain, supertokens, words))
    assert len(words) == VOCAB
    assert by_words["bytes_per_token"] > chars["bytes_per_token"] > base["bytes_per_token"]


def test_word_chunks_cut_only_between_words():

    text = "def f(x):\n    return x  +  1\n\n\nclass A:  pass\n  "
    for seed in range(5):
        (chunks,) = word_chunks([text], random.Random(seed), max_words=3)
        assert "".join(chunks) == text
        for chunk in chunks[:-1]:
            assert not chunk[-1].isspace() and chunk.strip()
            assert 1 <= len(chunk.split()) <= 3
    with pytest.raises(LmpressError, match=r"max_words: must be at least 1"):
        train_bpe(["x y"], 300, supertokens=True, chunking="words", max_words=0)
    with pytest.raises(LmpressError, match=r"chunking: 'lines' is not one of chars, words"):
        train_bpe(["x y"], 300, supertokens=True, chunking="lines")


def test_supertokens_learn_multi_word_tokens(plain, supertokens):
    def inner_space(tok) -> int:  # tokens with a space after their first character
        return sum("Ġ" in t[1:].lstrip("Ġ") for t in tok.get_vocab())

    assert inner_space(supertokens) > 10 * max(inner_space(plain), 1)


@pytest.mark.parametrize("kind", ["plain", "supertokens", "words"])
def test_round_trip_is_exact(kind, corpus, request):
    tok = request.getfixturevalue(kind)
    for text in corpus[1][:5] + ODD_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_same_seed_same_tokenizer_other_seed_other_merges(corpus):
    texts = corpus[0][:10]
    a, b, c = (train_bpe(texts, 600, supertokens=True, seed=s) for s in (0, 0, 1))
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert a.backend_tokenizer.to_str() != c.backend_tokenizer.to_str()
    assert train_bpe(texts, 600).get_vocab() == train_bpe(texts, 600).get_vocab()


def test_source_special_tokens_and_chat_template_carry_over(source, supertokens):
    assert supertokens.special_tokens_map == source.special_tokens_map
    assert supertokens.extra_special_tokens == source.extra_special_tokens
    for token in source.all_special_tokens:
        assert supertokens.convert_ids_to_tokens(supertokens.encode(token)) == [token]
    chat = [{"role": "user", "content": "hi there"}]
    assert supertokens.apply_chat_template(chat, tokenize=False) == source.apply_chat_template(
        chat, tokenize=False
    )
    assert supertokens.model_max_length == source.model_max_length


def test_bos_framing_of_the_source_carries_over(corpus):
    source = _llama_like_source()
    tok = train_bpe(corpus[0][:5], 400, source_tokenizer=source)
    ids = tok.encode("def f(): pass")
    assert ids[0] == tok.bos_token_id and tok.bos_token == "<s>"
    assert tok.encode("def f(): pass", add_special_tokens=False) == ids[1:]
    assert tok.unk_token == "<unk>"


def test_without_source_endoftext_is_eos_and_pad(corpus):
    tok = train_bpe(corpus[0][:5], 400)
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == 0 and len(tok) == 400


def test_compression_stats_count_bytes_chars_tokens_and_words():
    tok = train_bpe(["abc"], BYTE_ALPHABET + 1)  # no merges: one token per byte
    stats = compression_stats(tok, ["é a", "b"])  # 4 + 1 bytes, 3 + 1 chars, 3 words
    assert stats["tokens"] == 5
    assert stats["bytes_per_token"] == 1.0
    assert stats["chars_per_token"] == pytest.approx(4 / 5)
    assert stats["tokens_per_word"] == pytest.approx(5 / 3)


@pytest.mark.parametrize(
    ("texts", "vocab", "message"),
    [
        ([], 500, "transplant_tokenizer.corpus: the corpus is empty"),
        (["", ""], 500, "transplant_tokenizer.corpus: the corpus is empty"),
        (["some text"], 256, "transplant_tokenizer.vocab_size: 256 is smaller"),
    ],
)
def test_bad_inputs_raise_a_one_line_error(texts, vocab, message):
    with pytest.raises(LmpressError, match=message.replace(".", r"\.")):
        train_bpe(texts, vocab)


def test_vocab_too_small_for_the_source_specials(source):
    with pytest.raises(LmpressError, match=r"vocab_size: 258 .* 4 special/added tokens \(260\)"):
        train_bpe(["text"], 258, source_tokenizer=source)
    with pytest.raises(LmpressError, match="eval_corpus"):
        compression_stats(source, [])


def _llama_like_source() -> PreTrainedTokenizerFast:
    """A tokenizer that prepends <s> to every text, as Llama's do."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
