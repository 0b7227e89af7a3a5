import logging

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.generate import generate, generate_text, sample_next, stream, stream_text
from gptlab.model import GPTConfig, GPTModel
from gptlab.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel(GPTConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


def test_greedy_is_argmax_of_the_model(model):
    ids = torch.tensor([[15496, 11, 314]])
    out = generate(model, ids, 3)
    expected = ids
    for _ in range(3):
        expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)
    assert torch.equal(generate(model, ids[0], 3), expected[0])  # 1-D in, 1-D out


def test_sampling_is_reproducible_with_a_seed(model):
    ids = torch.tensor([[15496, 11]])
    a = generate(model, ids, 20, temperature=1.0, seed=3)
    assert torch.equal(a, generate(model, ids, 20, temperature=1.0, seed=3))
    assert not torch.equal(a, generate(model, ids, 20, temperature=1.0, seed=4))


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        assert sample_next(logits, 1.0, top_k=1, generator=g).item() == 1
        assert sample_next(logits, 5.0, top_k=2, generator=g).item() in (1, 2)
        assert sample_next(logits, 1.0, top_p=0.01, generator=g).item() == 1
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    seen = {sample_next(probs, 1.0, top_p=0.8, generator=torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8: the tail is never drawn


def test_each_sequence_stops_at_its_own_end_of_text(model):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = generate(model, ids, 6)
    eos = int(free[0, 4])  # a token sequence 0 generates
    first = 3 + free[0, 3:].tolist().index(eos)
    out = generate(model, ids, 6, eos_id=eos)
    assert torch.equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first:] == eos).all()  # finished: padded with eos
    if eos not in free[1, 3:]:
        assert torch.equal(out[1], free[1])  # the other sequence is unaffected
    single = generate(model, ids[:1], 6, eos_id=eos)
    assert single.shape[1] == first + 1  # stops as soon as every sequence has finished


def test_stream_text_pieces_join_to_generate_text(model, tok):
    pieces = list(stream_text(model, tok, "Hello, I am", max_new_tokens=15, temperature=1.0, seed=1, stop_at_eot=False))
    ids = generate(model, torch.tensor([tok.encode("Hello, I am")]), 15, temperature=1.0, seed=1)[0, 4:]
    assert "".join(pieces) == tok.decode(ids.tolist())
    assert generate_text(model, tok, "Hello, I am", 15, temperature=1.0, seed=1, stop_at_eot=False) == "".join(pieces)


def test_stop_strings_end_the_text_and_are_not_shown(model, tok):
    full = generate_text(model, tok, "Hello", 30, stop_at_eot=False)
    stop = full[10:13]
    assert len(stop) == 3
    cut = generate_text(model, tok, "Hello", 30, stop=[stop], stop_at_eot=False)
    assert cut == full[: full.find(stop)]
    assert stop not in "".join(stream_text(model, tok, "Hello", 30, stop=[stop], stop_at_eot=False))


def test_long_prompt_is_cut_from_the_left_with_a_warning(model, tok, caplog):
    prompt = "word " * 200  # 200 tokens, context is 64
    with caplog.at_level(logging.WARNING, logger="gptlab"):
        text = generate_text(model, tok, prompt, 5, stop_at_eot=False)
    assert "keeping the last 63" in caplog.text
    assert len(tok.encode(text)) >= 1


def test_bad_sampling_options(model):
    ids = torch.tensor([[1]])
    for kwargs, match in [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top-k"), ({"top_p": 1.5}, "top-p")]:
        with pytest.raises(GptlabError, match=match):
            next(stream(model, ids, 3, **kwargs))


# --- decoding the stream: incremental, and exactly what decoding the whole continuation gave -------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gptlab import config  # noqa: E402
from gptlab.bpe import train_bpe  # noqa: E402
from gptlab.generate import TextStats, check_sampling, decode_stream  # noqa: E402
from gptlab.tokenizer import ByteLevelTokenizer, SimpleTokenizerV2  # noqa: E402


def whole_decode_stream(ids, tokenizer, stop, eos_id, stats):
    """The algorithm stream_text used before it went incremental: decode every id so far at every token."""
    stop = [s for s in stop if s]
    stats.completion_tokens, stats.finish_reason = 0, "length"
    new_ids, emitted = [], 0
    holdback = max((len(s) for s in stop), default=1) - 1
    for token_id in ids:
        stats.completion_tokens += 1
        if eos_id is not None and token_id == eos_id:
            stats.finish_reason = "stop"
            break
        new_ids.append(token_id)
        text = tokenizer.decode(new_ids)
        cut = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            stats.finish_reason = "stop"
            if cut > emitted:
                yield text[emitted:cut]
            return
        safe = len(text) - holdback
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text = tokenizer.decode(new_ids)
    if len(text) > emitted:
        yield text[emitted:]


SMALL_TEXT = "héllo wörld, it's 日本語 and 🙂👍🏽 — café\n\n   spaces\tand tabs 12345 <|endoftext|> ÿ"
_TOKENIZERS = {}


def tokenizer_named(name):
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = {"gpt2": lambda: get_tokenizer("gpt2"), "bpe": lambda: train_bpe(SMALL_TEXT * 3, 300),
                             "words": lambda: SimpleTokenizerV2.from_text(SMALL_TEXT)}[name]()
    return _TOKENIZERS[name]


@st.composite
def decoding_cases(draw):
    name = draw(st.sampled_from(["gpt2", "bpe", "words"]))
    tok = tokenizer_named(name)
    # single-byte ids (0..255 are the 256 bytes in both BPEs) split characters and make invalid UTF-8
    any_id = st.integers(0, tok.n_vocab - 1)
    ids = draw(st.lists(st.one_of(any_id, st.integers(0, min(255, tok.n_vocab - 1))), max_size=40))
    eos = draw(st.one_of(st.none(), st.just(tok.eot_id)))
    text = tok.decode([i for i in ids if i != eos])
    substrings = st.builds(lambda a, n: text[a : a + n], st.integers(0, max(0, len(text) - 1)), st.integers(1, 6))
    stop = draw(st.lists(st.one_of(substrings, st.text("ab \ufffd\n😀é", min_size=1, max_size=3), st.just("")),
                         max_size=3))
    return tok, ids, stop, eos


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=decoding_cases())
def test_incremental_decoding_yields_exactly_the_pieces_of_whole_decoding(case):
    tok, ids, stop, eos = case
    stats, expected_stats = TextStats(), TextStats()
    pieces = list(decode_stream(ids, tok, stop, eos, stats))
    expected = list(whole_decode_stream(ids, tok, stop, eos, expected_stats))
    assert pieces == expected
    assert stats == expected_stats


class CountingTokenizer:
    """GPT-2, counting the ids each decode call is handed."""

    def __init__(self, inner):
        self.inner, self.decoded_ids, self.decode_calls = inner, 0, 0
        self.name, self.n_vocab, self.eot_id, self.fingerprint = inner.name, inner.n_vocab, inner.eot_id, "x"

    def decode_bytes(self, ids):
        ids = list(ids)
        self.decoded_ids += len(ids)
        return self.inner.decode_bytes(ids)

    def decode(self, ids):
        self.decode_calls += 1
        return self.inner.decode(ids)


def test_incremental_decoding_decodes_each_token_once(tok):
    counting = CountingTokenizer(tok)
    ids = tok.encode("The quick brown fox — naïve café, 日本語 🙂! " * 100)  # about 2,000 tokens
    text = "".join(decode_stream(ids, counting, stop=["never appears"]))
    assert text == tok.decode(ids)
    assert counting.decoded_ids == len(ids) and counting.decode_calls == 0  # linear: n ids, not n^2 / 2


def test_stream_stops_at_the_first_stop_string_without_reading_further(tok):
    ids = tok.encode("one two three four five six")
    seen = []

    def tokens():
        for i in ids:
            seen.append(i)
            yield i

    stats = TextStats()
    assert "".join(decode_stream(tokens(), tok, stop=[" thr"], stats=stats)) == "one two"
    assert stats.finish_reason == "stop" and stats.completion_tokens == len(seen) < len(ids)


def test_multibyte_characters_split_across_tokens_are_held_back(tok):
    emoji = "🙂".encode("utf-8")
    ids = tok.encode("a") + tok.encode("b")
    byte_ids = [tok._enc.encode_single_token(emoji[i : i + 1]) for i in range(4)]
    pieces = list(decode_stream(ids + byte_ids, tok))
    assert pieces == ["a", "b", "🙂"]  # nothing shown while the character is incomplete
    assert list(decode_stream(byte_ids[:2], tok)) == ["\ufffd"]  # cut short: one U+FFFD, as decode gives


def test_byte_level_tokenizers_give_the_bytes_of_tokens(tok):
    bpe = tokenizer_named("bpe")
    for t in (tok, bpe):
        assert isinstance(t, ByteLevelTokenizer)
        ids = t.encode("naïve 🙂")
        assert t.decode_bytes(ids) == "naïve 🙂".encode("utf-8")
    assert not isinstance(tokenizer_named("words"), ByteLevelTokenizer)


def test_check_sampling_is_the_one_in_config():
    assert check_sampling is config.check_sampling


def test_closing_stream_text_early_restores_the_model(model, tok):
    model.train()
    pieces = stream_text(model, tok, "Hello", 20, stop_at_eot=False)
    next(pieces)
    assert not model.training  # generating in eval mode
    pieces.close()
    assert model.training
    model.eval()
