"""Continuous batching (gptlab.batching): a generation's output does not depend on what else runs with it.

Every check compares the batch with the same request decoded alone by ``gptlab.generate.stream_text``:
greedy and seeded tokens exactly, and each step's logits to 1e-4 (the batched matmuls add in another order
than batch 1, so bit equality is not expected; the measured gap is ~1e-6).
"""
from __future__ import annotations

import pytest
import torch

from gptlab.batching import ContinuousBatch
from gptlab.config import SamplingConfig
from gptlab.errors import GptlabError
from gptlab.generate import stream_text
from gptlab.linear import CPULinear, onednn_kernels
from gptlab.model import GPTConfig, GPTModel, RaggedKVCache
from gptlab.tokenizer import GPT2Tokenizer

PROMPTS = ["Every effort moves you", "The quick brown fox jumps over the lazy dog and then", "Hi",
           "Once upon a time there was a king who", "To be, or not"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel(GPTConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return GPT2Tokenizer()


def alone(model, tokenizer, prompt: str, config: SamplingConfig) -> str:
    return "".join(stream_text(model, tokenizer, prompt, **config.kwargs()))


def run(batch: ContinuousBatch, arrivals: dict[int, list[tuple[str, SamplingConfig]]], steps: int = 400):
    """Add each (prompt, config) at its step; step until all finish. Returns streams, their texts, and logits."""
    streams, texts, logits, seen = [], {}, {}, {}
    for step in range(steps):
        for prompt, config in arrivals.get(step, []):
            streams.append(batch.add(prompt, config))
        batch.step()
        for s in streams:
            if s.generated > seen.get(id(s), 0):  # it drew a token this step
                seen[id(s)] = s.generated
                logits.setdefault(id(s), []).append(s.last_logits.clone())
            for kind, value in s.take():
                if kind == "text":
                    texts[id(s)] = texts.get(id(s), "") + value
        if batch.size == 0 and step >= max(arrivals):
            break
    return streams, [texts.get(id(s), "") for s in streams], [logits.get(id(s), []) for s in streams]


def test_greedy_requests_of_different_lengths_joining_at_different_steps_match_alone(model, tokenizer):
    configs = [SamplingConfig(max_new_tokens=n) for n in (20, 7, 30, 12, 25)]
    arrivals = {0: [(PROMPTS[0], configs[0]), (PROMPTS[1], configs[1])], 3: [(PROMPTS[2], configs[2])],
                5: [(PROMPTS[3], configs[3])], 9: [(PROMPTS[4], configs[4])]}
    streams, texts, _ = run(ContinuousBatch(model, tokenizer), arrivals)
    assert texts == [alone(model, tokenizer, p, c) for p, c in zip(PROMPTS, configs)]
    assert [s.stats.completion_tokens for s in streams] == [20, 7, 30, 12, 25]
    assert all(s.done for s in streams)


def test_each_steps_logits_equal_the_request_alone_to_1e_4(model, tokenizer):
    # The reference: the whole sequence through the model without a cache (teacher forcing).
    configs = [SamplingConfig(max_new_tokens=n) for n in (10, 16, 6)]
    arrivals = {0: [(PROMPTS[0], configs[0])], 2: [(PROMPTS[1], configs[1]), (PROMPTS[2], configs[2])]}
    streams, _, logits = run(ContinuousBatch(model, tokenizer), arrivals)
    for s, got in zip(streams, logits):
        prompt_len = s.stats.prompt_tokens
        with torch.no_grad():
            want = model(torch.tensor([s.ids[:-1]]))[0, prompt_len - 1 :]  # (new, V)
        assert len(got) == want.size(0) == s.generated
        diff = (torch.cat(got) - want).abs().max().item()
        assert diff < 1e-4, diff


def test_newcomers_prefilled_together_or_apart_by_length_match_alone(model, tokenizer):
    # one step's newcomers: the three short ones share a padded prefill, the 50-token one goes alone
    long_prompt = " ".join(["word"] * 50)
    prompts = [PROMPTS[0], PROMPTS[4], long_prompt, PROMPTS[2]]
    configs = [SamplingConfig(max_new_tokens=n) for n in (9, 5, 8, 12)]
    _, texts, _ = run(ContinuousBatch(model, tokenizer), {0: list(zip(prompts, configs))})
    assert texts == [alone(model, tokenizer, p, c) for p, c in zip(prompts, configs)]


def test_sampling_settings_seeds_and_penalties_stay_per_request(model, tokenizer):
    configs = [SamplingConfig(max_new_tokens=15, temperature=0.9, seed=5),
               SamplingConfig(max_new_tokens=15, temperature=1.2, top_k=50, seed=6),
               SamplingConfig(max_new_tokens=15, presence_penalty=1.5, frequency_penalty=0.5),
               SamplingConfig(max_new_tokens=15, temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=8),
               SamplingConfig(max_new_tokens=15, stop=("e",))]
    arrivals = {i: [(p, c)] for i, (p, c) in enumerate(zip(PROMPTS, configs))}
    streams, texts, _ = run(ContinuousBatch(model, tokenizer), arrivals)
    assert texts == [alone(model, tokenizer, p, c) for p, c in zip(PROMPTS, configs)]
    assert streams[4].stats.finish_reason == "stop" and "e" not in texts[4]


def test_a_generation_past_the_context_window_matches_alone(model, tokenizer):
    # tiny's context is 64: the long one leaves the cache and recomputes its window, as stream() does
    configs = [SamplingConfig(max_new_tokens=90), SamplingConfig(max_new_tokens=20)]
    arrivals = {0: [(PROMPTS[1], configs[0])], 1: [(PROMPTS[0], configs[1])]}
    streams, texts, _ = run(ContinuousBatch(model, tokenizer), arrivals)
    assert len(streams[0].ids) > model.config.context_length
    assert texts == [alone(model, tokenizer, PROMPTS[1], configs[0]), alone(model, tokenizer, PROMPTS[0], configs[1])]


def test_removed_rows_free_at_once_and_the_cache_fits_the_requests(model, tokenizer):
    batch = ContinuousBatch(model, tokenizer)
    a = batch.add(PROMPTS[0], SamplingConfig(max_new_tokens=40))
    b = batch.add(PROMPTS[2], SamplingConfig(max_new_tokens=10))
    c = batch.add(PROMPTS[3], SamplingConfig(max_new_tokens=40))
    batch.step()
    assert batch.size == 3 and batch.cache.rows == 3
    batch.step()  # a three-row decoding step: on the packed weights, where oneDNN packs here
    packs = CPULinear.use_onednn and onednn_kernels().reorder is not None
    assert (model.lm_head.packed is not None) == packs
    assert batch.cache.max_len == 64  # the longest need (prompt + 40) rounded up, capped at the context
    rows = list(batch.running)
    batch.remove(a)  # the last row moves into its place; the others go on untouched
    moved = rows[-1]
    rows[rows.index(a)] = moved
    batch.step()
    assert batch.size == 2 and batch.running == rows[:-1]
    assert int(batch.cache.lengths[batch.running.index(moved)]) == len(moved.ids) - 1
    for _ in range(50):
        batch.step()
    assert b.done and c.done and batch.size == 0 and batch.cache is None  # an idle batch holds no cache
    assert model.lm_head.packed is None  # and no packed weight copies
    assert c.stats.completion_tokens == 40 and c.take()[-1] == ("finish", c.stats)


def test_ragged_cache_positions_are_per_row():
    config = GPTConfig.preset("tiny")
    cache = RaggedKVCache(config, rows=3, max_len=16, device="cpu", dtype=torch.float32)
    cache.lengths[:3] = torch.tensor([5, 2, 9])
    cache.begin(3)
    positions, longest = cache.positions(1, "cpu")
    assert positions.tolist() == [[5], [2], [9]] and longest == 10
    mask = cache._step[2][:, 0, 0]  # (rows, span): each row sees its own positions and the new one
    assert mask.sum(dim=1).tolist() == [6, 3, 10]


def test_what_the_batch_cannot_decode_is_refused(model, tokenizer):
    batch = ContinuousBatch(model, tokenizer)
    with pytest.raises(GptlabError, match="plain sampling"):
        batch.add("x", SamplingConfig(num_beams=2))
    with pytest.raises(GptlabError, match="top logprobs"):
        batch.add("x", SamplingConfig(), logprobs=21)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_quantized_model_batches_like_it_decodes_alone(tokenizer, kind):
    # The server batches whatever `--quantize` loaded: its integer layers see 1 to 3 rows per step here.
    from gptlab.config import QuantizeConfig
    from gptlab.quantize import quantize_model

    torch.manual_seed(0)
    quantized = quantize_model(GPTModel(GPTConfig.preset("tiny")).eval(), QuantizeConfig(kind))
    configs = [SamplingConfig(max_new_tokens=n) for n in (12, 5, 9)]
    arrivals = {0: [(PROMPTS[0], configs[0]), (PROMPTS[1], configs[1])], 2: [(PROMPTS[2], configs[2])]}
    _, texts, _ = run(ContinuousBatch(quantized, tokenizer), arrivals)
    assert texts == [alone(quantized, tokenizer, p, c) for p, c in zip(PROMPTS, configs)]
