"""Beam search, step for step Hugging Face's (``transformers`` ``generate(num_beams=N, do_sample=False)``).

Each step every running beam proposes its next tokens; of the ``num_beams x V`` continuations scored by
their summed log-probabilities, the best ``2 x num_beams`` are kept (enough to leave ``num_beams`` running
even if all of the best ones end). A continuation that ends (end-of-text, a stop string or the length limit)
and ranks among the first ``num_beams`` becomes a finished hypothesis scored ``sum log p / length**length_penalty``
(length counts the new tokens); the best ``num_beams`` unfinished ones run on. The search ends:

    early_stopping=True     as soon as ``num_beams`` hypotheses have finished;
    early_stopping=False    also when the best running beam, scored at its current length, cannot beat the
                            worst finished hypothesis (Hugging Face's heuristic, its default);
    early_stopping="never"  the same test, but with a positive length penalty the running beam is scored at the
                            longest length it could reach: stop only when no beam can do better.

The beams are the rows of one batch: the model runs all of them in one forward pass, and the KV cache's
rows are reordered (``index_select`` on the batch dimension) to follow each survivor's parent, so nothing
is recomputed. Hugging Face applies its logits processors to the log-probabilities here, so the penalties
are applied to them too (``gptlab.sampling.Penalties``).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from gptlab.linear import packed_weights
from gptlab.model import GPTModel, KVCache
from gptlab.sampling import Penalties

NEG = -1.0e9  # Hugging Face's "impossible" score: added, never used as -inf, so the arithmetic matches


@dataclass
class Hypothesis:
    """One finished beam: its new tokens (the end-of-text or the stop string's last token included) and score."""

    tokens: list[int]
    score: float


def reorder_cache(cache: KVCache, rows: torch.Tensor) -> None:
    """Make row i of every layer's keys and values a copy of row ``rows[i]`` (only the filled positions)."""
    for store in (*cache.k, *cache.v):  # each (B, nh, max_len, hs)
        filled = store.narrow(2, 0, cache.pos)
        filled.copy_(filled.index_select(0, rows))


@torch.no_grad()
def beam_search(
    model: GPTModel,
    ids: torch.Tensor,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_id: int | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    use_cache: bool = True,
    penalties: Penalties | None = None,
) -> list[Hypothesis]:
    """The best ``num_return_sequences`` hypotheses for the prompt ``ids`` (T,) or (1, T), best first.

    ``stop(new_tokens)`` says whether a continuation's new tokens end in a stop string (it then finishes like
    an end-of-text). ``penalties``: tables for one row (the prompt), or None.
    """
    ids = ids.reshape(1, -1)
    device = next(model.parameters()).device
    ids = ids.to(device)
    T, V, ctx = ids.size(1), model.config.vocab_size, model.config.context_length
    max_length = T + max_new_tokens
    if max_new_tokens == 0:
        return [Hypothesis([], 0.0)] * num_return_sequences
    keep = max(2, 1 + (eos_id is not None)) * num_beams  # candidates kept per step
    top_mask = torch.arange(keep, device=device) < num_beams  # only these may finish

    running = torch.full((num_beams, max_length), eos_id if eos_id is not None else -1, dtype=torch.long, device=device)
    running[:, :T] = ids
    running_scores = torch.zeros(num_beams, device=device)
    running_scores[1:] = NEG  # all beams start equal: only the first one's continuations count at step one
    sequences, lengths = running.clone(), torch.zeros(num_beams, dtype=torch.long, device=device)
    scores = torch.full((num_beams,), NEG, device=device)
    finished = torch.zeros(num_beams, dtype=torch.bool, device=device)
    improvable = True  # Hugging Face's is_early_stop_heuristic_unsatisfied (once False, stays False)
    if penalties is not None:
        penalties = penalties.select(torch.zeros(num_beams, dtype=torch.long, device=device))

    cache = None
    if use_cache:
        cache = KVCache(model.config, num_beams, min(ctx, max_length), device, model.wpe.weight.dtype)
    was_training = model.training
    model.eval()
    try:
        with packed_weights(model, num_beams) if num_beams > 1 else nullcontext():
            for cur_len in range(T, max_length):
                if cur_len == T and cache is not None and T <= ctx:
                    logits = _prefill(model, ids, cache)  # the prompt once, its keys and values copied to every beam
                elif cache is not None and cur_len <= ctx:
                    logits = model(running[:, cache.pos : cur_len], cache=cache, last_only=True)
                else:  # past the context (or no cache): the last ctx tokens in full
                    logits = model(running[:, max(0, cur_len - ctx) : cur_len], last_only=True)
                log_probs = torch.log_softmax(logits[:, -1, :].float(), dim=-1).expand(num_beams, V)
                if penalties is not None:
                    log_probs = penalties.apply(log_probs)
                total = (log_probs + running_scores[:, None]).reshape(-1)  # (num_beams * V,)

                top_scores, top_index = torch.topk(total, keep)
                parents, tokens = top_index // V, top_index % V
                candidates = running.index_select(0, parents)
                candidates[:, cur_len] = tokens
                if cur_len + 1 >= max_length:  # the length limit ends every continuation
                    ends = torch.ones(keep, dtype=torch.bool, device=device)
                else:
                    ends = torch.zeros(keep, dtype=torch.bool, device=device) if eos_id is None else tokens == eos_id
                    if stop is not None:
                        ends |= torch.tensor([stop(c[T : cur_len + 1].tolist()) for c in candidates], device=device)

                # the best unfinished continuations run on
                running_candidates = top_scores + ends.float() * NEG
                survivors = torch.topk(running_candidates, num_beams).indices
                running, running_scores = candidates[survivors], running_candidates[survivors]
                survivor_parents = parents[survivors]

                # finished ones join the hypotheses if they are better than the worst kept so far
                finals = top_scores / ((cur_len + 1 - T) ** length_penalty)
                finals = finals + float(bool(finished.all()) and early_stopping is True) * NEG
                finals = finals + float(not improvable) * NEG
                finals = finals + (~(ends & top_mask)).float() * NEG
                merged = torch.cat((scores, finals))
                best = torch.topk(merged, num_beams).indices
                sequences = torch.cat((sequences, candidates))[best]
                lengths = torch.cat((lengths, torch.full((keep,), cur_len + 1 - T, device=device)))[best]
                finished = torch.cat((finished, ends & top_mask))[best]
                scores = merged[best]

                if cache is not None and cur_len < ctx and not torch.equal(
                        survivor_parents, torch.arange(num_beams, device=device)):
                    reorder_cache(cache, survivor_parents)
                if penalties is not None:
                    penalties = penalties.select(survivor_parents)
                    penalties.add(running[:, cur_len])

                # stop when no running beam can improve on the finished ones (Hugging Face's three conditions)
                if early_stopping == "never" and length_penalty > 0.0:
                    best_length = max_length - T
                else:
                    best_length = cur_len + 1 - T
                best_running = running_scores[0] / (best_length**length_penalty)
                worst_finished = torch.where(finished, scores.min(), torch.tensor(NEG, device=device))
                improvable = improvable and bool((best_running > worst_finished).any())
                open_beam = not (bool(finished.all()) and early_stopping is True)
                if not (improvable and open_beam and not bool(ends.all())):
                    break
    finally:
        model.train(was_training)
    return [Hypothesis(sequences[i, T : T + lengths[i]].tolist(), float(scores[i]))
            for i in range(num_return_sequences)]


def _prefill(model: GPTModel, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompt (1, T) once and copy its keys and values into every beam's row; its last logits (1, 1, V)."""
    one = KVCache(model.config, 1, ids.size(1), ids.device, model.wpe.weight.dtype)
    logits = model(ids, cache=one, last_only=True)
    for mine, theirs in zip((*cache.k, *cache.v), (*one.k, *one.v)):
        mine.narrow(2, 0, one.pos).copy_(theirs)  # broadcast over the beams
    cache.pos = one.pos
    return logits
