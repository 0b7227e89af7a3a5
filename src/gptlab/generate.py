"""Sampling text from a model: greedy, temperature, top-k, top-p, end-of-text and stop strings, streaming.

Token level: ``stream`` yields each new column of ids; ``generate`` returns them appended to the prompt.
Text level: ``stream_text`` / ``generate_text`` add the tokenizer, stop strings and prompt cropping;
``decode_stream`` turns ids into text pieces as they arrive, decoding each token once (linear in the length).

With the KV cache each step feeds one token. Absolute position embeddings mean that once a sequence
outgrows the context window every position shifts, so from then on each step recomputes the last
``context_length`` tokens in full: exactly what the uncached path does, hence identical tokens.
"""
from __future__ import annotations

import codecs
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass

import torch

from gptlab.config import check_sampling  # noqa: F401  (re-exported: one set of sampling rules)
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
    ids = encode_prompt(tokenizer, prompt, model.config.context_length)
    stats = stats if stats is not None else TextStats()
    stats.prompt_tokens = len(ids)
    eos = tokenizer.eot_id if stop_at_eot else None
    # closing: when the caller stops early, the model's stream ends now (its cache freed, train mode restored)
    with closing(stream(model, torch.tensor([ids]), max_new_tokens, temperature, top_k, top_p, eos, use_cache,
                        seed)) as tokens:
        yield from decode_stream((int(token[0]) for token in tokens), tokenizer, stop, eos, stats)


def decode_stream(token_ids: Iterable[int], tokenizer: Tokenizer, stop: Sequence[str] = (),
                  eos_id: int | None = None, stats: TextStats | None = None) -> Iterator[str]:
    """Yield the text of ``token_ids`` in pieces as soon as they are final: the pieces join to
    ``tokenizer.decode(ids)``, cut before the first stop string or ``eos_id`` (which ends the text, unshown).

    Each token is decoded once (``_ContinuationText``), and only the text not yet yielded, plus the last
    ``max(len(stop))`` characters a stop string could start in, is searched: linear in the length.
    """
    stop = [s for s in stop if s]
    stats = stats if stats is not None else TextStats()
    stats.completion_tokens, stats.finish_reason = 0, "length"
    holdback = max((len(s) for s in stop), default=1) - 1  # characters that may be a stop string's start
    reach = max((len(s) for s in stop), default=0)  # how far back the stop search starts (as it always has)
    text = _ContinuationText(tokenizer)
    emitted = 0  # characters yielded so far
    for token_id in token_ids:
        stats.completion_tokens += 1
        if eos_id is not None and token_id == eos_id:
            stats.finish_reason = "stop"
            break
        text.add(token_id)
        cut = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            stats.finish_reason = "stop"
            if cut > emitted:
                yield text.slice(emitted, cut)
            return
        safe = len(text) - holdback
        if text.endswith_replacement():  # an incomplete UTF-8 sequence: wait for the next token
            safe = min(safe, len(text) - 1)
        if safe > emitted:
            yield text.slice(emitted, safe)
            emitted = safe
            text.forget_before(emitted - reach)
    if len(text) > emitted:
        yield text.slice(emitted, len(text))


class _ContinuationText:
    """``tokenizer.decode(ids so far)`` as tokens arrive, held from ``start`` on only (indices are absolute).

    A byte-level tokenizer's tokens go once each through an incremental UTF-8 decoder: ``done`` is the text of
    the complete characters, ``pending`` the decoder's held bytes as a whole decode shows them (U+FFFD), so
    ``done + pending`` is ``tokenizer.decode`` of all ids, character for character. A tokenizer without bytes
    is decoded whole each time (its text need not be the join of its tokens' texts; quadratic, but the
    word-level tokenizers that lack bytes are for teaching).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decode_bytes = getattr(tokenizer, "decode_bytes", None)  # a ByteLevelTokenizer has it
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []  # kept only for a tokenizer without bytes
        self.start = 0  # absolute index of done[0]
        self.done, self.pending = "", ""

    def add(self, token_id: int) -> None:
        if self.decode_bytes is not None:
            self.done += self.decoder.decode(self.decode_bytes([token_id]))
            self.pending = self.decoder.getstate()[0].decode("utf-8", errors="replace")
        else:
            self.ids.append(token_id)
            self.done = self.tokenizer.decode(self.ids)[self.start :]

    @property
    def held(self) -> str:
        """The text from ``start`` on."""
        return self.done + self.pending

    def __len__(self) -> int:
        return self.start + len(self.done) + len(self.pending)

    def find(self, s: str, at: int) -> int:
        """``decode(ids).find(s, at)``, for ``at >= start``."""
        i = self.held.find(s, at - self.start)
        return i + self.start if i >= 0 else -1

    def slice(self, a: int, b: int) -> str:
        return self.held[a - self.start : b - self.start]

    def endswith_replacement(self) -> bool:
        return (self.pending or self.done).endswith("\ufffd")

    def forget_before(self, index: int) -> None:
        """Drop the text before ``index`` (final text only: a pending character may still change)."""
        drop = min(max(0, index - self.start), len(self.done))
        self.done, self.start = self.done[drop:], self.start + drop


def generate_text(model: GPTModel, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 50, **kwargs) -> str:
    """The continuation of ``prompt`` (without the prompt itself); same options as ``stream_text``."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, **kwargs))
