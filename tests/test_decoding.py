"""Beam search, penalties, min-p, speculative and prompt-lookup decoding, each against its reference.

Beam search and the repetition penalty are compared token for token with ``transformers``' ``generate`` on the
same random weights (a ``GPT2LMHeadModel`` saved by transformers, read by ``gptlab.load``); the logits
processors with Hugging Face's classes and OpenAI's formula; speculative and prompt-lookup decoding with the
model's own greedy output, and (sampling) with its distribution, by a chi-square test on a tiny vocabulary.
"""
from __future__ import annotations

import copy
import io
import itertools
import json
from collections import Counter

import pytest
import torch

import gptlab
from gptlab.beam import beam_search
from gptlab.bpe import train_bpe
from gptlab.cli import main
from gptlab.config import SamplingConfig
from gptlab.errors import GptlabError
from gptlab.generate import check_draft, generate, generate_texts, stop_check, stream, stream_text
from gptlab.model import GPTConfig, GPTModel
from gptlab.run import save_model
from gptlab.sampling import Penalties, filter_logits
from gptlab.speculative import PromptLookup, SpeculationStats, verify
from gptlab.tokenizer import get_tokenizer

transformers = pytest.importorskip("transformers")  # in the dev extra
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.generation.logits_process import (  # noqa: E402
    MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)

transformers.logging.set_verbosity_error()
V = 1000  # small enough to be quick, large enough that 2 x num_beams candidates never reach the -1e9 placeholders


def perturbed(model: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """Weights far from the init's near-uniform logits, so that no two candidates tie to rounding."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """The same random weights as transformers' GPT2LMHeadModel and as gptlab's model."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=None,
                        eos_token_id=None)
    hf = perturbed(GPT2LMHeadModel(config), 0.3)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    model, _ = gptlab.load(folder)
    return hf, model


def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (1, n), generator=g) for n in (1, 4, 9)]


def hf_generate(hf, ids, eos, **kwargs):
    return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=eos,
                       pad_token_id=eos if eos is not None else 0, **kwargs)


# ---- beam search -----------------------------------------------------------------------------------

BEAM_SETTINGS = [  # num_beams, length_penalty, early_stopping, num_return_sequences, max_new_tokens
    (2, 1.0, False, 1, 8),
    (4, 1.0, False, 2, 12),
    (4, 2.0, "never", 3, 10),
    (3, -1.0, True, 3, 12),
    (5, 0.0, "never", 1, 7),
    (4, 1.5, False, 4, 12),
    (3, 0.5, True, 1, 5),
]


@pytest.mark.parametrize("setting", BEAM_SETTINGS, ids=lambda s: f"beams{s[0]}-lp{s[1]}-es{s[2]}-n{s[3]}")
def test_beam_search_equals_transformers(hf_pair, setting):
    hf, model = hf_pair
    num_beams, length_penalty, early_stopping, n, max_new = setting
    ended_early = 0
    for ids in prompts():
        greedy = generate(model, ids, 6)[0, ids.size(1):].tolist()
        for eos in (None, greedy[0], greedy[2]):  # end-of-text tokens that the beams do emit
            expected = hf_generate(hf, ids, eos, max_new_tokens=max_new, num_beams=num_beams,
                                   length_penalty=length_penalty, early_stopping=early_stopping,
                                   num_return_sequences=n)
            got = generate(model, ids, max_new, eos_id=eos, num_beams=num_beams, length_penalty=length_penalty,
                           early_stopping=early_stopping, num_return_sequences=n)
            assert got.shape == expected.shape and torch.equal(got, expected), (ids, eos)
            ended_early += eos is not None and bool((got[:, ids.size(1):] == eos).any())
    if length_penalty <= 1.0:  # a stronger one favours long beams so much that the short finished ones all lose
        assert ended_early, "no answer ended at the end-of-text: the test would not see the finished-beam bookkeeping"


def test_beam_search_with_repetition_penalty_equals_transformers(hf_pair):
    hf, model = hf_pair
    for ids in prompts():
        expected = hf_generate(hf, ids, None, max_new_tokens=10, num_beams=3, repetition_penalty=1.8,
                               num_return_sequences=2)
        got = generate(model, ids, 10, num_beams=3, repetition_penalty=1.8, num_return_sequences=2)
        assert torch.equal(got, expected)
        assert not torch.equal(got, generate(model, ids, 10, num_beams=3, num_return_sequences=2))  # it did act


def test_beam_cache_reordering_matches_recomputing(hf_pair):
    _, model = hf_pair
    for ids in prompts():
        cached = generate(model, ids, 12, num_beams=4, num_return_sequences=4)
        assert torch.equal(cached, generate(model, ids, 12, num_beams=4, num_return_sequences=4, use_cache=False))
    # past the context window (64) every step recomputes: the same as without the cache
    long = torch.randint(0, V, (1, 60), generator=torch.Generator().manual_seed(3))
    assert torch.equal(generate(model, long, 8, num_beams=3), generate(model, long, 8, num_beams=3, use_cache=False))


def test_one_beam_is_greedy(hf_pair):
    _, model = hf_pair
    for ids in prompts():
        assert torch.equal(generate(model, ids, 9, num_beams=1), generate(model, ids, 9))
        best = beam_search(model, ids, 9, num_beams=1)[0]
        assert best.tokens == generate(model, ids, 9)[0, ids.size(1):].tolist()


# ---- penalties and filters ------------------------------------------------------------------------

def test_greedy_repetition_penalty_equals_transformers(hf_pair):
    hf, model = hf_pair
    for ids in prompts():
        for penalty in (0.7, 1.3, 2.5):
            expected = hf_generate(hf, ids, None, max_new_tokens=12, repetition_penalty=penalty)
            assert torch.equal(generate(model, ids, 12, repetition_penalty=penalty), expected)


def _logits_and_history(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 40, generator=g) * 4, torch.randint(0, 40, (3, 15), generator=g)


def _penalties(ids: torch.Tensor, prompt_len: int, **kwargs) -> Penalties:
    pen = Penalties(ids[:, :prompt_len], 40, **kwargs)
    for column in ids[:, prompt_len:].T:
        pen.add(column)
    return pen


@pytest.mark.parametrize("penalty", [0.5, 1.2, 3.0])
def test_repetition_penalty_equals_hf_processor(penalty):
    for seed in range(3):
        logits, ids = _logits_and_history(seed)
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())  # every token of the text
        assert torch.equal(_penalties(ids, 6, repetition_penalty=penalty).apply(logits), expected)


def openai_penalised(logits: torch.Tensor, generated: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's formula: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, c counting the
    tokens sampled so far (https://platform.openai.com/docs/guides/text-generation, "frequency and presence")."""
    out = logits.clone()
    for row, tokens in enumerate(generated.tolist()):
        for j, c in Counter(tokens).items():
            out[row, j] = out[row, j] - c * frequency - float(c > 0) * presence
    return out


@pytest.mark.parametrize("presence, frequency", [(0.5, 0.0), (0.0, 0.7), (1.5, -0.4), (-2.0, 2.0)])
def test_presence_and_frequency_penalties_equal_openai_formula(presence, frequency):
    for seed in range(3):
        logits, ids = _logits_and_history(seed)
        got = _penalties(ids, 6, presence_penalty=presence, frequency_penalty=frequency).apply(logits)
        torch.testing.assert_close(got, openai_penalised(logits, ids[:, 6:], presence, frequency), rtol=0, atol=1e-6)
        unseen = torch.ones(40, dtype=torch.bool)
        unseen[ids[0, 6:]] = False
        assert torch.equal(got[0, unseen], logits[0, unseen])  # the prompt does not count


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_equals_hf_warper(min_p):
    for seed in range(3):
        logits, ids = _logits_and_history(seed)
        expected = MinPLogitsWarper(min_p)(ids, logits.clone())
        assert torch.equal(filter_logits(logits, 1.0, min_p=min_p), expected)


def test_filters_compose_in_hugging_face_order():
    """temperature -> top-k -> top-p -> min-p, as Hugging Face's warpers run (the penalties come first)."""
    for seed in range(5):
        logits, ids = _logits_and_history(seed)
        expected = logits.clone()
        warpers = (TemperatureLogitsWarper(0.7), TopKLogitsWarper(12), TopPLogitsWarper(0.8), MinPLogitsWarper(0.1))
        for warper in warpers:
            expected = warper(ids, expected)
        got = filter_logits(logits, 0.7, top_k=12, top_p=0.8, min_p=0.1)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_penalties_and_min_p_change_sampling_as_documented():
    torch.manual_seed(0)
    model = perturbed(GPTModel(GPTConfig.preset("tiny")), 0.3)
    ids = torch.tensor([[5, 6, 7]])
    a = generate(model, ids, 30, temperature=1.0, seed=2, min_p=0.2, frequency_penalty=1.0)
    assert torch.equal(a, generate(model, ids, 30, temperature=1.0, seed=2, min_p=0.2, frequency_penalty=1.0))
    # a strong presence penalty forbids repeats in greedy decoding (the random model loops without it)
    loops = generate(model, ids, 30)[0, 3:].tolist()
    assert len(set(loops)) < 30
    fresh = generate(model, ids, 30, presence_penalty=2.0, frequency_penalty=2.0)[0, 3:].tolist()
    assert len(set(fresh)) > len(set(loops))


# ---- speculative and prompt-lookup decoding -------------------------------------------------------

@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return perturbed(GPTModel(GPTConfig.preset("tiny")), 0.3)


@pytest.fixture(scope="module")
def close_draft(target):
    """The target's weights, a little perturbed: it agrees with the target often, not always."""
    return perturbed(copy.deepcopy(target), 0.04, seed=5)


def test_speculative_greedy_is_the_models_greedy(target, close_draft):
    small = perturbed(GPTModel(GPTConfig.preset("tiny", n_layer=1)), 0.3, seed=2)
    g = torch.Generator().manual_seed(0)
    stats = SpeculationStats()
    for T, max_new, ks in ((1, 12, (2,)), (5, 25, (1, 4)), (30, 45, (3,))):  # the last runs past the 64-token context
        ids = torch.randint(0, 50257, (1, T), generator=g)
        plain = generate(target, ids, max_new)
        for k in ks:
            assert torch.equal(generate(target, ids, max_new, draft=close_draft, draft_tokens=k, speculation=stats),
                               plain)
        assert torch.equal(generate(target, ids, max_new, draft=small, draft_tokens=3), plain)
    assert 0.1 < stats.acceptance_rate < 0.95, stats  # guesses were kept and rejected: both paths ran
    itself = SpeculationStats()
    generate(target, ids[:, :20], 20, draft=target, draft_tokens=4, speculation=itself)
    assert itself.acceptance_rate == 1.0 and itself.rounds == 4  # a perfect draft: 5 tokens per check


def test_speculative_greedy_with_penalties_and_end_of_text(target, close_draft):
    ids = torch.tensor([[11, 12, 13, 14]])
    settings = dict(repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.2)
    plain = generate(target, ids, 25, **settings)
    assert torch.equal(generate(target, ids, 25, draft=close_draft, **settings), plain)
    assert torch.equal(generate(target, ids, 25, prompt_lookup=2, **settings), plain)
    eos = int(plain[0, 12])
    stopped = generate(target, ids, 25, eos_id=eos, **settings)
    assert stopped.size(1) < plain.size(1)
    assert torch.equal(generate(target, ids, 25, eos_id=eos, draft=close_draft, draft_tokens=5, **settings), stopped)
    assert torch.equal(generate(target, ids, 25, eos_id=eos, prompt_lookup=3, **settings), stopped)


def test_prompt_lookup_greedy_is_the_models_greedy(target):
    g = torch.Generator().manual_seed(4)
    stats = SpeculationStats()
    for T, max_new in ((6, 40), (20, 30)):
        piece = torch.randint(0, 50257, (1, T // 2), generator=g)
        ids = torch.cat([piece, piece], dim=1)  # a repeated prompt, and a random model that loops: matches
        plain = generate(target, ids, max_new)
        for n, k in ((1, 2), (3, 5), (2, 10)):
            assert torch.equal(generate(target, ids, max_new, prompt_lookup=n, draft_tokens=k, speculation=stats),
                               plain)
    assert stats.accepted > 0 and stats.accepted < stats.proposed


def test_prompt_lookup_proposes_what_followed_the_latest_full_match():
    lookup = PromptLookup([1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3], max_ngram=3)
    assert lookup.propose(3) == [5, 6, 2]  # "2 3" last occurred at 5 with 3 tokens after; "6 2 3" never did
    assert lookup.propose(5) == [4, 9, 2, 3, 5]  # only 4 follow the one at 5: the first one, at 1, serves
    lookup.extend([4])
    assert lookup.propose(2) == [9, 2]  # now "2 3 4" matches
    assert PromptLookup([7, 8], 2).propose(4) == []
    assert PromptLookup([5, 7, 7, 7, 7], 1).propose(4) == [7, 7, 7]  # a loop: the first occurrence offers most


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    statistic = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor((len(probs) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, statistic.double() / 2))  # the chi-square survival function


@pytest.mark.parametrize("guesser", ["draft", "lookup"])
def test_acceptance_rule_draws_from_the_models_distribution(guesser):
    """``verify`` alone, in a decoder's loop: position s has the model's law p[s] and the guesser's q[s] (fixed, so
    the tokens are independent); guesses are drawn from q, kept or replaced; the first three tokens must follow
    p[0] x p[1] x p[2] (rejections, residual draws and the free token after all-kept guesses all take part).
    A draft's q is a distribution; prompt lookup's is certain (one-hot on the token it copies)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    q = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.7, 0.1, 0.1, 0.1], [0.05, 0.05, 0.1, 0.8]])
    if guesser == "lookup":
        q = torch.nn.functional.one_hot(torch.tensor([0, 3, 1]), 4).float()
    counts, outcomes = torch.zeros(64), Counter()
    for _ in range(3000):
        tokens: list[int] = []
        while len(tokens) < 3:
            s, k = len(tokens), min(2, 2 - len(tokens))  # at most two guesses; never past the third token
            guesses = [int(torch.multinomial(q[s + j], 1, generator=g)) for j in range(k)]
            kept, new = verify(guesses, p[s : s + k + 1], q[s : s + k], greedy=False, generator=g)
            outcomes[kept == k] += 1
            tokens += [*guesses[:kept], new]
        counts[tokens[0] * 16 + tokens[1] * 4 + tokens[2]] += 1
    assert outcomes[True] > 300 and outcomes[False] > 300  # both branches ran often
    law = (p[0][:, None, None] * p[1][None, :, None] * p[2][None, None, :]).reshape(-1)
    assert chi_square_p_value(counts, law) > 1e-3
    if guesser == "draft":
        wrong = (q[0][:, None, None] * q[1][None, :, None] * p[2][None, None, :]).reshape(-1)
        assert chi_square_p_value(counts, wrong) < 1e-9  # the test has the power to see the draft's law


def test_sampled_speculative_decoding_is_distributed_as_the_model():
    """End to end on a 3-token vocabulary: the law of the first three sampled tokens, drawn with a draft model,
    against the target's exact joint probabilities (the caches, positions and q's line up)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=3, context_length=16, n_embd=16, n_layer=1, n_head=2)
    target = perturbed(GPTModel(config), 0.15, seed=3)  # every one of the 27 outcomes has p > 0.01
    draft = perturbed(GPTModel(config), 0.15, seed=4)
    prompt, L = torch.tensor([[1, 2, 0, 1]]), 3
    cells = torch.tensor(list(itertools.product(range(3), repeat=L)))
    full = torch.cat([prompt.expand(len(cells), -1), cells], dim=1)
    with torch.no_grad():
        def joint(m):
            log_probs = m(full[:, :-1])[:, prompt.size(1) - 1 :].log_softmax(-1)
            return log_probs.gather(-1, full[:, prompt.size(1):, None]).squeeze(-1).sum(-1).exp()
        exact, drafts = joint(target), joint(draft)
    assert 0.5 * (exact - drafts).abs().sum() > 0.3  # the draft alone is far from the target
    place = torch.tensor([9, 3, 1])
    counts, stats = torch.zeros(27), SpeculationStats()
    for seed in range(450):  # >= 5 expected draws in every cell
        out = generate(target, prompt, L, temperature=1.0, seed=seed, speculation=stats, draft=draft,
                       draft_tokens=2)[0, 4:]
        counts[int((out * place).sum())] += 1
    assert 0.05 < stats.acceptance_rate < 0.95, stats
    assert chi_square_p_value(counts, exact) > 1e-3
    assert chi_square_p_value(counts, drafts) < 1e-9  # the test would catch the draft's law


def test_speculative_sampling_is_reproducible(target, close_draft):
    ids = torch.tensor([[3, 4, 5]])
    a = generate(target, ids, 20, temperature=0.9, top_k=40, seed=7, draft=close_draft)
    assert torch.equal(a, generate(target, ids, 20, temperature=0.9, top_k=40, seed=7, draft=close_draft))
    # top-k 1 makes sampling certain: the sampled acceptance rule (residual draws included) must give greedy tokens
    piece = torch.tensor([[3, 4, 5, 6, 3, 4, 5, 6]])
    greedy = generate(target, piece, 30)
    for options in (dict(draft=close_draft), dict(prompt_lookup=2, draft_tokens=6)):
        stats = SpeculationStats()
        assert torch.equal(generate(target, piece, 30, temperature=1.0, top_k=1, seed=1, speculation=stats,
                                    **options), greedy)
        assert 0 < stats.accepted < stats.proposed


# ---- text level and command line --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


def test_beam_text_stop_strings_and_several_answers(target, tok):
    free = generate_texts(target, tok, "Hello there", 12, num_return_sequences=3, num_beams=3, stop_at_eot=False)
    assert len(free) == 3 and free[0] == "".join(stream_text(target, tok, "Hello there", 12, num_beams=3,
                                                             stop_at_eot=False))
    stop = free[0][4:7]
    ids = torch.tensor(tok.encode("Hello there"))
    check = stop_check(tok, [stop])
    best = beam_search(target, ids, 12, 3, stop=check)[0]
    text = tok.decode(best.tokens)
    assert stop in text and stop not in tok.decode(best.tokens[:-1])  # the stop string finished this beam
    cut = generate_texts(target, tok, "Hello there", 12, num_beams=3, stop=[stop], stop_at_eot=False)[0]
    assert cut == text[: text.find(stop)] and stop not in cut


def test_sampled_answers_use_consecutive_seeds(target, tok):
    texts = generate_texts(target, tok, "Hi", 8, num_return_sequences=3, temperature=1.0, seed=10, min_p=0.05)
    assert texts == [generate_texts(target, tok, "Hi", 8, temperature=1.0, seed=10 + i, min_p=0.05)[0]
                     for i in range(3)]
    assert len(set(texts)) > 1


@pytest.mark.parametrize("settings, message", [
    (dict(num_beams=0), "num-beams must be at least 1"),
    (dict(num_beams=2, temperature=0.8), "beam search is greedy"),
    (dict(num_beams=2, top_k=5), "top-k filters what is sampled"),
    (dict(num_beams=2, min_p=0.1), "min-p filters"),
    (dict(length_penalty=2.0), "length-penalty only applies to beam search"),
    (dict(early_stopping="never"), "early-stopping only applies to beam search"),
    (dict(num_beams=2, early_stopping="sometimes"), "early-stopping must be true, false or never"),
    (dict(num_beams=2, num_return_sequences=3), "cannot exceed num-beams"),
    (dict(num_return_sequences=2), "greedy decoding has one answer"),
    (dict(repetition_penalty=0.0), "repetition-penalty must be a positive number"),
    (dict(repetition_penalty=float("nan")), "repetition-penalty"),
    (dict(presence_penalty=2.5), "presence-penalty must be between -2 and 2"),
    (dict(frequency_penalty=-3.0), "frequency-penalty must be between -2 and 2"),
    (dict(min_p=1.5), "min-p must be in"),
    (dict(draft_tokens=0), "draft-tokens must be at least 1"),
    (dict(prompt_lookup=0), "prompt-lookup must be at least 1"),
    (dict(draft="runs/small", prompt_lookup=2), "not both"),
    (dict(num_beams=3, prompt_lookup=2), "beam search cannot be combined"),
])
def test_bad_settings_are_one_line_errors(settings, message, target):
    with pytest.raises(GptlabError, match=message) as e:
        SamplingConfig(**settings)
    assert "\n" not in str(e.value)
    if "draft" not in settings:  # the Python API refuses the same, in the same words
        with pytest.raises(GptlabError, match=message):
            generate(target, torch.tensor([[1, 2]]), 3, **settings)


def test_bad_drafts_are_refused(target, tok):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(GptlabError, match="50000-token vocabulary"):
        list(stream(target, ids, 3, draft=GPTModel(GPTConfig.preset("tiny", vocab_size=50000))))
    with pytest.raises(GptlabError, match="32 tokens of context, fewer than the model's 64"):
        list(stream(target, ids, 3, draft=GPTModel(GPTConfig.preset("tiny", context_length=32))))
    with pytest.raises(GptlabError, match="drop --no-cache"):
        list(stream(target, ids, 3, prompt_lookup=2, use_cache=False))
    with pytest.raises(GptlabError, match="one sequence at a time"):
        list(stream(target, ids.repeat(2, 1), 3, prompt_lookup=2))
    with pytest.raises(GptlabError, match="must be a loaded model"):
        list(stream_text(target, tok, "hi", 3, draft="runs/draft"))
    other = get_tokenizer("gpt2")
    other_fingerprint = type("Other", (), {"name": "bpe", "fingerprint": "0123abcd"})()
    check_draft(target, target, tok, other)  # the same tokenizer: fine
    with pytest.raises(GptlabError, match="uses another tokenizer \\(bpe, fingerprint 0123abcd\\)"):
        check_draft(target, target, tok, other_fingerprint)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, target, close_draft):
    folder = tmp_path_factory.mktemp("runs")
    tok = get_tokenizer("gpt2")
    save_model(folder / "target", target, tok)
    save_model(folder / "draft", close_draft, tok)
    return folder


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_decoders(runs, target, tok, capsys, caplog):
    common = ["generate", "--model", runs / "target", "--prompt", "The cat sat", "--max-new-tokens", 12]
    code, plain, _ = run_cli(capsys, *common)
    assert code == 0 and plain == "The cat sat" + generate_texts(target, tok, "The cat sat", 12)[0] + "\n"
    code, out, err = run_cli(capsys, *common, "--draft", runs / "draft", "--draft-tokens", 3)
    assert code == 0 and out == plain and "guessed tokens kept" in caplog.text
    assert run_cli(capsys, *common, "--prompt-lookup", 2)[1] == plain
    code, out, _ = run_cli(capsys, *common, "--num-beams", 3, "--num-return-sequences", 2, "--length-penalty", 0.5,
                           "--early-stopping", "never", "--repetition-penalty", 1.2)
    beams = generate_texts(target, tok, "The cat sat", 12, num_return_sequences=2, num_beams=3, length_penalty=0.5,
                           early_stopping="never", repetition_penalty=1.2)
    assert code == 0 and out == "".join(f"--- {i} of 2 ---\nThe cat sat{t}\n" for i, t in enumerate(beams, 1))


def test_cli_bad_decoding_options_are_one_line_errors(runs, tmp_path, capsys):
    common = ["generate", "--model", runs / "target", "--prompt", "x"]
    for extra, message in ((["--num-beams", 2, "--temperature", 1], "beam search is greedy"),
                           (["--length-penalty", 1.5], "only applies to beam search"),
                           (["--draft-tokens", 0], "draft-tokens must be at least 1"),
                           (["--frequency-penalty", 9], "frequency-penalty must be between -2 and 2")):
        code, _, err = run_cli(capsys, *common, *extra)
        assert code == 2 and message in err and err.count("\n") == 1
    short = GPTModel(GPTConfig.preset("tiny", context_length=32))
    save_model(tmp_path / "short", short, get_tokenizer("gpt2"))
    code, _, err = run_cli(capsys, *common, "--draft", tmp_path / "short")
    assert code == 2 and "fewer than the model's 64" in err and err.count("\n") == 1
    other = train_bpe("the cat sat on the mat " * 20, 300)  # a draft saved with another tokenizer
    save_model(tmp_path / "other", GPTModel(GPTConfig.preset("tiny", vocab_size=other.n_vocab)), other)
    code, _, err = run_cli(capsys, *common, "--draft", tmp_path / "other")
    assert code == 2 and "uses another tokenizer" in err and err.count("\n") == 1


def test_cli_respond_and_chat_take_the_decoding_options(runs, target, tok, tmp_path, capsys, monkeypatch):
    from gptlab.prompts import get_prompt_style
    from gptlab.respond import respond

    records = [{"instruction": "Rewrite the sentence.", "input": "The cat sat on the mat.", "output": "x"},
               {"instruction": "Say hi.", "input": "", "output": "hi"}]
    (tmp_path / "in.json").write_text(json.dumps(records))
    style = get_prompt_style("alpaca")
    for extra, settings in ((["--num-beams", 2], dict(num_beams=2)),
                            (["--prompt-lookup", 3], dict()),
                            (["--draft", runs / "draft"], dict())):
        code, _, _ = run_cli(capsys, "respond", "--model", runs / "target", "--input", tmp_path / "in.json",
                             "--output", tmp_path / "out.json", "--max-new-tokens", 8, "--quiet", *extra)
        expected = respond(target, tok, style, records, max_new_tokens=8, progress=False, **settings)
        assert code == 0 and json.loads((tmp_path / "out.json").read_text()) == expected
    code, _, err = run_cli(capsys, "respond", "--model", runs / "target", "--input", tmp_path / "in.json",
                           "--output", tmp_path / "out.json", "--num-beams", 2, "--num-return-sequences", 2)
    assert code == 2 and "one answer per record" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/exit\n"))
    code, out, _ = run_cli(capsys, "chat", "--model", runs / "target", "--max-new-tokens", 6,
                           "--draft", runs / "draft", "--presence-penalty", 0.5)
    assert code == 0 and "chatting in the alpaca prompt style" in out
