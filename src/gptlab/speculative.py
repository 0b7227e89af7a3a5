"""Speculative decoding: guess the next few tokens cheaply, then let the model check them all in one pass.

The guess comes from a draft model, a smaller one with the same tokenizer (Leviathan et al. 2023, Chen
et al. 2023), or from the text itself: prompt lookup copies the tokens that followed an earlier occurrence
of the last n tokens (n from ``max_ngram`` down to 1; Saxena 2023, Hugging Face's ``prompt_lookup_num_tokens``),
which pays off when the answer repeats its input (a rewrite, an edit, code) or itself.

Each round the model reads the last accepted token and the k guesses in one forward pass with the KV
cache, which gives its own distribution p after each of them. Then, guess by guess:

    greedy    a guess is kept while it equals the model's argmax; the first miss is replaced by the argmax,
              so the tokens are exactly the model's greedy ones;
    sampling  guess x (drawn from the draft's distribution q) is kept with probability min(1, p(x) / q(x));
              the first one rejected is replaced by a draw from max(p - q, 0), renormalised. Every token is
              then distributed exactly as the model's own sampling would be (the papers' theorem). Prompt
              lookup's guesses are certain (q is one-hot on the guess).

When every guess is kept, the model's distribution after the last one gives one more token for free.
Both the model's and the draft's caches keep every token but the last accepted one; after a rejection
they are rolled back by lowering ``cache.pos`` (what lies beyond is overwritten later).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gptlab.linear import packed_weights
from gptlab.model import GPTModel, KVCache
from gptlab.sampling import Penalties, probabilities


@dataclass
class SpeculationStats:
    """How the guesses fared: filled in as decoding goes."""

    rounds: int = 0  # forward passes of the model that checked at least one guess
    proposed: int = 0  # guesses made
    accepted: int = 0  # guesses kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class PromptLookup:
    """Guesses from the text so far: what followed an earlier occurrence of its last n tokens, longest n first.

    Which occurrence: the most recent one that has k tokens after it, else the first one (it has the most).
    The most recent is the likeliest context: in an Alpaca prompt a common word first appears in the template's
    preamble, while the answer copies the input, which comes later. But inside a repeating stretch the most
    recent occurrence is one period back and offers only that much, so then the first one serves (Hugging
    Face's ``prompt_lookup_num_tokens`` always takes the first). Two indexes, n-gram -> first and -> last
    start (among those with a token after them), are kept up to date as tokens arrive, so a lookup costs a
    few dictionary reads.
    """

    def __init__(self, tokens: list[int], max_ngram: int) -> None:
        self.tokens: list[int] = []
        self.max_ngram = max_ngram
        self.first: dict[tuple[int, ...], int] = {}
        self.last: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, new: list[int]) -> None:
        for token in new:
            self.tokens.append(token)
            end = len(self.tokens) - 1  # the n-grams ending just before the new token now have a successor
            for n in range(1, min(self.max_ngram, end) + 1):
                ngram = tuple(self.tokens[end - n : end])
                self.first.setdefault(ngram, end - n)
                self.last[ngram] = end - n

    def propose(self, k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(self.tokens) - 1), 0, -1):
            ngram = tuple(self.tokens[-n:])
            start = self.last.get(ngram)
            if start is not None:
                if len(self.tokens) - (start + n) < k:  # too close to the end: a repeating stretch
                    start = self.first[ngram]
                return self.tokens[start + n : start + n + k]
        return []


def verify(guesses: list[int], p: torch.Tensor, q: torch.Tensor | None, greedy: bool,
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """How many guesses to keep, and the token that follows them.

    ``p`` (k + 1, V): the model's distributions after each accepted token and guess (row i judges guess i;
    the last row follows all of them). ``q`` (k, V): the distributions the guesses were drawn from (greedy:
    unused). Greedy compares with p's argmax; sampling applies the acceptance rule of the module docstring.
    """
    k = len(guesses)
    if greedy:
        best = p.argmax(dim=-1).tolist()
        for i, guess in enumerate(guesses):
            if guess != best[i]:
                return i, best[i]
        return k, best[k]
    chances = torch.rand(k, generator=generator, device=p.device) if k else None
    for i, guess in enumerate(guesses):
        ratio = p[i, guess] / q[i, guess]
        if chances[i] < ratio:
            continue
        residual = (p[i] - q[i]).clamp(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: p itself is the residual
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))


@torch.no_grad()
def speculative_stream(
    model: GPTModel,
    ids: torch.Tensor,
    max_new_tokens: int,
    draft: GPTModel | None = None,
    prompt_lookup: int | None = None,
    draft_tokens: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    penalties: Penalties | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    stats: SpeculationStats | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token (1,) of one sequence ``ids`` (1, T), guessed by ``draft`` or by ``prompt_lookup``.

    The models are expected in eval mode; ``penalties`` are one row's tables (updated as tokens are kept).
    """
    device = ids.device
    ctx = model.config.context_length
    stats = stats if stats is not None else SpeculationStats()
    greedy = temperature <= 0.0
    T = ids.size(1)
    total = T + max_new_tokens
    buffer = torch.empty(1, total + draft_tokens, dtype=ids.dtype, device=device)  # room for the last guesses
    buffer[:, :T] = ids
    cache = KVCache(model.config, 1, min(ctx, total), device, model.wpe.weight.dtype)
    if 1 < T <= ctx:  # invariant: the cache holds every token but the last (whose logits the next round needs)
        model(buffer[:, : T - 1], cache=cache, last_only=True)
    draft_cache = None
    if draft is not None:
        draft_cache = KVCache(draft.config, 1, min(draft.config.context_length, total), device, draft.wpe.weight.dtype)
    lookup = PromptLookup(ids[0].tolist(), prompt_lookup) if prompt_lookup is not None else None

    def dist(logits: torch.Tensor, pen: Penalties | None) -> torch.Tensor:
        """What a token is drawn from: the distribution, or (greedy) the penalised logits, whose argmax is all
        that counts."""
        logits = pen.apply(logits) if pen is not None else logits
        return logits if greedy else probabilities(logits, temperature, top_k, top_p, min_p)

    with packed_weights(model, draft_tokens + 1):  # the model reads k + 1 rows per check: oneDNN's packed layout
        yield from _rounds(model, draft, lookup, buffer, cache, draft_cache, T, total, draft_tokens, dist, penalties,
                           greedy, eos_id, generator, stats)


def _rounds(model: GPTModel, draft: GPTModel | None, lookup: PromptLookup | None, buffer: torch.Tensor,
            cache: KVCache, draft_cache: KVCache | None, n: int, total: int, draft_tokens: int, dist,
            penalties: Penalties | None, greedy: bool, eos_id: int | None, generator: torch.Generator | None,
            stats: SpeculationStats) -> Iterator[torch.Tensor]:
    """Guess, check, keep, from ``n`` tokens to ``total``; yields each kept token."""
    device, ctx = buffer.device, model.config.context_length
    while n < total:
        if n > ctx:  # past the context: every step recomputes the last ctx tokens, nothing to speculate with
            logits = model(buffer[:, n - ctx : n], last_only=True)[:, -1]
            kept, guesses, new = 0, [], _draw(dist(logits, penalties)[0], greedy, generator)
        else:
            k = max(0, min(draft_tokens, total - n - 1, ctx - n))  # the check reads positions n-1 .. n+k-1
            guesses, q = [], None
            if k and lookup is not None:
                guesses = lookup.propose(k)
            elif k and draft is not None:
                guesses, q = _draft_guesses(draft, draft_cache, buffer, n, k, dist, penalties, greedy, generator)
            m = len(guesses)
            if m:
                buffer[0, n : n + m] = torch.tensor(guesses, dtype=buffer.dtype, device=device)
            logits = model(buffer[:, cache.pos : n + m], cache=cache)[0, -(m + 1):]  # (m + 1, V)
            p = _distributions(logits, guesses, penalties, dist)
            if q is None and m and not greedy:  # prompt lookup: the guesses were certain
                q = torch.nn.functional.one_hot(torch.tensor(guesses, device=device), p.size(-1)).float()
            kept, new = verify(guesses, p, q, greedy, generator)
            if m:
                stats.rounds += 1
                stats.proposed += m
                stats.accepted += kept
            cache.pos = n + kept  # roll back the rejected guesses: keep all but the new last token
            if draft_cache is not None:
                draft_cache.pos = min(draft_cache.pos, n + kept)
        out = [*guesses[:kept], new]
        buffer[0, n : n + len(out)] = torch.tensor(out, dtype=buffer.dtype, device=device)
        for token in out:
            n += 1
            if penalties is not None:
                penalties.add(torch.tensor([token], device=device))
            if lookup is not None:
                lookup.extend([token])
            yield torch.tensor([token], device=device)
            if token == eos_id:
                return


def _draw(scores: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> int:
    """One token from ``dist``'s output (V,): its argmax when greedy (logits), else a draw (probabilities)."""
    if greedy:
        return int(scores.argmax())
    return int(torch.multinomial(scores, 1, generator=generator))


def _distributions(logits: torch.Tensor, guesses: list[int], penalties: Penalties | None, dist) -> torch.Tensor:
    """The model's next-token distributions (m + 1, V), each penalised with the guesses before it as history."""
    if penalties is None:
        return dist(logits, None)
    pen, rows = penalties.copy(), []
    for i in range(len(guesses) + 1):
        rows.append(dist(logits[i : i + 1], pen))
        if i < len(guesses):
            pen.add(torch.tensor([guesses[i]], device=logits.device))
    return torch.cat(rows)


def _draft_guesses(draft: GPTModel, cache: KVCache, buffer: torch.Tensor, n: int, k: int, dist,
                   penalties: Penalties | None, greedy: bool, generator: torch.Generator | None):
    """k guesses from the draft, one forward pass each, written into ``buffer`` after position n; and their q."""
    pen = penalties.copy() if penalties is not None else None
    guesses, qs = [], []
    for j in range(k):
        logits = draft(buffer[:, cache.pos : n + j], cache=cache, last_only=True)[:, -1]
        q = dist(logits, pen)
        guess = _draw(q[0], greedy, generator)
        buffer[0, n + j] = guess
        guesses.append(guess)
        qs.append(q)
        if pen is not None:
            pen.add(torch.tensor([guess], device=buffer.device))
    return guesses, torch.cat(qs)
