import pytest
from hypothesis import given, settings, strategies as st

from gptlab.errors import GptlabError
from gptlab.tokenizer import (ENDOFTEXT, GPT2Tokenizer, SimpleTokenizerV1, SimpleTokenizerV2, Tokenizer,
                              get_tokenizer)


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


def test_gpt2_known_ids(gpt2, verdict_path):
    assert gpt2.encode("Hello, world") == [15496, 11, 995]
    assert gpt2.encode("Hello, I am") == [15496, 11, 314, 716]
    assert len(gpt2.encode(verdict_path.read_text(encoding="utf-8"))) == 5145
    assert gpt2.n_vocab == 50257 and gpt2.eot_id == 50256


def test_endoftext_only_when_allowed(gpt2):
    text = f"a{ENDOFTEXT}b"
    assert 50256 not in gpt2.encode(text)
    assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.encode(text, allowed_special={ENDOFTEXT}) == [64, 50256, 65]
    assert gpt2.encode(text, allowed_special="all") == [64, 50256, 65]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_gpt2_round_trips_any_unicode(s):
    tok = get_tokenizer("gpt2")
    assert tok.decode(tok.encode(s)) == s


def test_every_tokenizer_satisfies_the_interface(verdict_path):
    text = verdict_path.read_text(encoding="utf-8")
    for tok in (get_tokenizer("gpt2"), SimpleTokenizerV1.from_text(text), SimpleTokenizerV2.from_text(text)):
        assert isinstance(tok, Tokenizer)


def test_simple_v1_matches_the_book(verdict_path):
    tok = SimpleTokenizerV1.from_text(verdict_path.read_text(encoding="utf-8"))
    assert tok.n_vocab == 1130 and tok.eot_id is None
    text = """"It's the last he painted, you know," Mrs. Gisburn said with pardonable pride."""
    ids = tok.encode(text)
    assert ids == [1, 56, 2, 850, 988, 602, 533, 746, 5, 1126, 596, 5, 1, 67, 7, 38, 851, 1108, 754, 793, 7]
    assert tok.decode(ids) == '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    with pytest.raises(GptlabError, match="'Hello' is not in"):
        tok.encode("Hello")


def test_simple_v2_unknown_words_and_endoftext(verdict_path, tmp_path):
    tok = SimpleTokenizerV2.from_text(verdict_path.read_text(encoding="utf-8"))
    assert tok.n_vocab == 1132 and tok.eot_id == 1130
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace."
    book_ids = [1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7]
    assert tok.encode(text, allowed_special="all") == book_ids
    assert tok.encode(text)[7] == 1131  # not allowed: the special text is just an unknown word
    assert tok.decode(book_ids) == "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."
    tok.save(tmp_path / "tok")
    again = get_tokenizer(tmp_path / "tok")
    assert type(again) is SimpleTokenizerV2 and again.encode(text, allowed_special="all") == book_ids


def test_get_tokenizer_errors(tmp_path):
    with pytest.raises(GptlabError, match="not found"):
        get_tokenizer(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(GptlabError, match="not a gptlab tokenizer"):
        get_tokenizer(tmp_path / "bad")
    assert isinstance(get_tokenizer("gpt2"), GPT2Tokenizer)


def test_bpe_concepts_are_reexported_from_the_tokenizer_module():
    import gptlab.bpe as bpe
    import gptlab.tokenizer as tokenizer

    for name in ("ENDOFTEXT", "GPT2_PATTERN", "TOKENIZER_FILE", "AllowedSpecial", "read_tiktoken_ranks", "BPETokenizer"):
        assert getattr(tokenizer, name) is getattr(bpe, name)


def test_every_tokenizer_has_a_fingerprint_of_its_vocabulary(verdict_path):
    import time

    from gptlab.tokenizer import GPT2Tokenizer

    text = verdict_path.read_text(encoding="utf-8")
    v1, v2 = SimpleTokenizerV1.from_text(text), SimpleTokenizerV2.from_text(text)
    gpt2 = get_tokenizer("gpt2")
    prints = [tok.fingerprint for tok in (gpt2, v1, v2, SimpleTokenizerV2.from_text(text[:500]))]
    assert all(len(p) == 16 and int(p, 16) >= 0 for p in prints) and len(set(prints)) == 4
    assert SimpleTokenizerV1.from_text(text).fingerprint == v1.fingerprint
    assert GPT2Tokenizer().fingerprint == gpt2.fingerprint
    fresh = GPT2Tokenizer()
    started = time.perf_counter()
    fresh.fingerprint  # computed once per process, not per tokenizer
    assert time.perf_counter() - started < 0.01
    assert v2.fingerprint is v2.fingerprint  # cached


def test_gpt2_gives_the_bytes_of_tokens(gpt2):
    from gptlab.tokenizer import ByteLevelTokenizer

    assert isinstance(gpt2, ByteLevelTokenizer)
    assert gpt2.decode_bytes([15496, 11, 995]) == b"Hello, world"
    ids = gpt2.encode("🙂")
    assert len(ids) > 1 and b"".join(gpt2.decode_bytes([i]) for i in ids) == "🙂".encode("utf-8")
