"""Sampling text from a model: greedy, temperature, top-k, top-p, end-of-text and stop strings, streaming.

Token level: ``stream`` yields each new column of ids; ``generate`` returns them appended to the prompt.
Text level: ``stream_text`` / ``generate_text`` add the tokenizer, stop strings and prompt cropping.

With the KV cache each step feeds one token. Absolute position embeddings mean that once a sequence
outgrows the context window every position shifts, so from then on each step recomputes the last
``context_length`` tokens in full: exactly what the uncached path does, hence identical tokens.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from gptlab.errors import GptlabError
from gptlab.linear import packed_weights
from gptlab.model import GPTModel, KVCache
from gptlab.tokenizer import Tokenizer

log = logging.getLogger("gptlab")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from logits (B, V); returns (B,). Temperature 0 is greedy."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    """Raise a GptlabError naming the first sampling setting that is out of range."""
    if temperature < 0:
        raise GptlabError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise GptlabError(f"top-k must be positive, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GptlabError(f"top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise GptlabError(f"max-new-tokens must be >= 0, got {max_new_tokens}")


@torch.no_grad()
def stream(
    model: GPTModel,
    ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, (B,), until ``max_new_tokens`` or all have emitted ``eos_id``.

    A sequence that has finished keeps receiving ``eos_id`` while the others go on.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    device = next(model.parameters()).device
    ids = ids.to(device)
    ctx = model.config.context_length
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    finished = torch.zeros(ids.size(0), dtype=torch.bool, device=device)
    B, T = ids.shape
    # One buffer for prompt + new tokens, written in place: no copy of the whole sequence per step.
    buffer = torch.empty(B, T + max_new_tokens, dtype=ids.dtype, device=device)
    buffer[:, :T] = ids
    cache = None
    if use_cache:  # sized to what this call can reach, not the whole context
        cache = KVCache(model.config, B, min(ctx, T + max_new_tokens), device, model.wte.weight.dtype)
    was_training = model.training
    model.eval()
    # batched decoding reads oneDNN-packed weight copies (twice the speed, for their memory, freed after)
    packing = packed_weights(model, B) if B > 1 else nullcontext()
    try:
        with packing:
            for n in range(T, T + max_new_tokens):  # n: tokens so far
                if cache is not None and n <= ctx:
                    logits = model(buffer[:, cache.pos : n], cache=cache, last_only=True)
                else:
                    logits = model(buffer[:, max(0, n - ctx) : n], last_only=True)
                next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B,)
                if eos_id is not None:
                    next_id = next_id.masked_fill(finished, eos_id)
                    finished |= next_id == eos_id
                buffer[:, n] = next_id
                yield next_id
                if eos_id is not None and bool(finished.all()):
                    break
    finally:
        model.train(was_training)


def generate(
    model: GPTModel,
    ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    seed: int | None = None,
) -> torch.Tensor:
    """Token ids (B, T) or (T,) to (B, T + new): the prompt with the generated tokens appended."""
    squeeze = ids.dim() == 1
    ids = ids.unsqueeze(0) if squeeze else ids
    new = list(stream(model, ids, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, seed))
    out = torch.cat([ids.to(new[0].device if new else ids.device), *(t.unsqueeze(1) for t in new)], dim=1)
    return out[0] if squeeze else out


def encode_prompt(tokenizer: Tokenizer, prompt: str, context_length: int, reserve: int = 1) -> list[int]:
    """Prompt ids, cut from the left (with a warning) so that ``reserve`` new tokens still fit the context."""
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eot_id is None:
            raise GptlabError("empty prompt and the tokenizer has no end-of-text token to start from")
        ids = [tokenizer.eot_id]  # GPT-2 convention: an unconditional sample starts after <|endoftext|>
    keep = max(1, context_length - reserve)
    if len(ids) > keep:
        log.warning("prompt is %d tokens; keeping the last %d to fit the context of %d", len(ids), keep, context_length)
        ids = ids[-keep:]
    return ids


@dataclass
class TextStats:
    """What ``stream_text`` did, filled in as it goes: token counts and why it stopped."""

    prompt_tokens: int = 0  # after cropping to the context
    completion_tokens: int = 0  # every sampled token, an end-of-text included
    finish_reason: str = "length"  # "stop": end-of-text or a stop string; "length": max_new_tokens reached


def stream_text(
    model: GPTModel,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_at_eot: bool = True,
    use_cache: bool = True,
    stats: TextStats | None = None,
) -> Iterator[str]:
    """Yield pieces of the continuation of ``prompt`` as soon as they are final.

    Text is held back while it could still be the start of a stop string or of a multi-byte character,
    so a caller printing the pieces never shows a stop string or a broken character.
    ``stats``, when given, receives the token counts and the finish reason (a server reports them).
    """
    stop = [s for s in stop if s]
    ids = encode_prompt(tokenizer, prompt, model.config.context_length)
    stats = stats if stats is not None else TextStats()
    stats.prompt_tokens, stats.completion_tokens, stats.finish_reason = len(ids), 0, "length"
    eos = tokenizer.eot_id if stop_at_eot else None
    new_ids: list[int] = []
    emitted = 0
    holdback = max((len(s) for s in stop), default=1) - 1
    for token in stream(model, torch.tensor([ids]), max_new_tokens, temperature, top_k, top_p, eos, use_cache, seed):
        token_id = int(token[0])
        stats.completion_tokens += 1
        if eos is not None and token_id == eos:
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
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            safe = min(safe, len(text) - 1)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text = tokenizer.decode(new_ids)
    if len(text) > emitted:
        yield text[emitted:]


def generate_text(model: GPTModel, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 50, **kwargs) -> str:
    """The continuation of ``prompt`` (without the prompt itself); same options as ``stream_text``."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, **kwargs))
