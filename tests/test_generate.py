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
