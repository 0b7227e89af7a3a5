"""Text from a model: greedy, sampling (temperature, top-k, top-p, min-p, penalties), beam search,
speculative and prompt-lookup decoding; end-of-text and stop strings, streaming.

Token level: ``stream`` yields each new column of ids; ``generate`` returns them appended to the prompt.
Text level: ``stream_text`` / ``generate_text`` / ``generate_texts`` add the tokenizer, stop strings and
prompt cropping; ``decode_stream`` turns ids into text pieces as they arrive, decoding each token once
(linear in the length).

The decoders live below this module, one concept each: ``gptlab.sampling`` (penalties and filters, in
their documented order), ``gptlab.beam`` (beam search, Hugging Face's) and ``gptlab.speculative`` (a draft
model or prompt lookup guesses, the model checks). Every setting is a field of ``gptlab.config.SamplingConfig``
and is checked there (``check_sampling``, ``check_decoding``), so the CLI, this API and the server refuse
the same things with the same words.

With the KV cache each step feeds one token. Absolute position embeddings mean that once a sequence
outgrows the context window every position shifts, so from then on each step recomputes the last
``context_length`` tokens in full: exactly what the uncached path does, hence identical tokens.
"""
from __future__ import annotations

import codecs
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

import torch

from gptlab.beam import Hypothesis, beam_search
from gptlab.config import check_decoding, check_sampling, early_stopping_value  # noqa: F401  (re-exported)
from gptlab.errors import GptlabError
from gptlab.linear import packed_weights
from gptlab.model import GPTModel, KVCache
from gptlab.sampling import Penalties, sample_next  # noqa: F401  (sample_next: re-exported for the API)
from gptlab.speculative import SpeculationStats, speculative_stream
from gptlab.tokenizer import Tokenizer

log = logging.getLogger("gptlab")


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
    *,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    num_return_sequences: int = 1,
    draft: GPTModel | None = None,
    draft_tokens: int = 4,
    prompt_lookup: int | None = None,
    speculation: SpeculationStats | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, (B,), until ``max_new_tokens`` or all have emitted ``eos_id``.

    A sequence that has finished keeps receiving ``eos_id`` while the others go on. ``num_return_sequences``
    repeats each prompt row that many times (independent samples, rows grouped by prompt). ``draft`` (a
    model with the same vocabulary) or ``prompt_lookup`` (longest n-gram) decode one sequence speculatively
    (``gptlab.speculative``): the same tokens when greedy, the same distribution when sampling; ``speculation``
    receives how many guesses were made and kept. Beam search does not stream: see ``generate``.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    check_decoding(temperature, top_k, top_p, num_return_sequences=num_return_sequences,
                   repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                   frequency_penalty=frequency_penalty, min_p=min_p, draft=draft is not None,
                   draft_tokens=draft_tokens, prompt_lookup=prompt_lookup)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if num_return_sequences > 1:
        ids = ids.repeat_interleave(num_return_sequences, dim=0)
    device = next(model.parameters()).device
    ids = ids.to(device)
    speculating = draft is not None or prompt_lookup is not None
    if speculating:
        if draft is not None:
            check_draft(model, draft)
        if not use_cache:
            raise GptlabError("--draft and --prompt-lookup work on the KV cache; drop --no-cache")
        if ids.size(0) != 1:
            raise GptlabError(f"speculative and prompt-lookup decoding take one sequence at a time, got {ids.size(0)}")
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    penalties = Penalties.make(ids, model.config.vocab_size, repetition_penalty, presence_penalty, frequency_penalty)
    models = [m for m in (model, draft) if m is not None]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        if speculating:
            yield from speculative_stream(model, ids, max_new_tokens, draft, prompt_lookup, draft_tokens, temperature,
                                          top_k, top_p, min_p, penalties, eos_id, generator, speculation)
        else:
            yield from _stream(model, ids, max_new_tokens, temperature, top_k, top_p, min_p, penalties, eos_id,
                               use_cache, generator)
    finally:
        for m, training in zip(models, was_training):
            m.train(training)


def _stream(model: GPTModel, ids: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
            top_p: float | None, min_p: float | None, penalties: Penalties | None, eos_id: int | None,
            use_cache: bool, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Plain decoding, one token per step for every row (the model in eval mode)."""
    device, ctx = ids.device, model.config.context_length
    finished = torch.zeros(ids.size(0), dtype=torch.bool, device=device)
    B, T = ids.shape
    # One buffer for prompt + new tokens, written in place: no copy of the whole sequence per step.
    buffer = torch.empty(B, T + max_new_tokens, dtype=ids.dtype, device=device)
    buffer[:, :T] = ids
    cache = None
    if use_cache:  # sized to what this call can reach, not the whole context
        cache = KVCache(model.config, B, min(ctx, T + max_new_tokens), device, model.wpe.weight.dtype)
    # batched (or bf16) decoding reads oneDNN-packed weight copies (twice the speed, for their memory, freed after)
    with packed_weights(model, B):
        for n in range(T, T + max_new_tokens):  # n: tokens so far
            if cache is not None and n <= ctx:
                logits = model(buffer[:, cache.pos : n], cache=cache, last_only=True)
            else:
                logits = model(buffer[:, max(0, n - ctx) : n], last_only=True)
            logits = logits[:, -1, :]
            if penalties is not None:
                logits = penalties.apply(logits)
            next_id = sample_next(logits, temperature, top_k, top_p, generator, min_p)  # (B,)
            if eos_id is not None:
                next_id = next_id.masked_fill(finished, eos_id)
                finished |= next_id == eos_id
            buffer[:, n] = next_id
            if penalties is not None:
                penalties.add(next_id)
            yield next_id
            if eos_id is not None and bool(finished.all()):
                break


def check_draft(model: GPTModel, draft: GPTModel, tokenizer: Tokenizer | None = None,
                draft_tokenizer: Tokenizer | None = None, name: str = "the draft model") -> None:
    """Refuse a draft that cannot guess for ``model``: another tokenizer (by fingerprint, when the tokenizers are
    given; else by vocabulary size) or a smaller context window."""
    if not isinstance(draft, GPTModel):
        raise GptlabError(f"draft must be a loaded model (gptlab.load(source)[0]), got {type(draft).__name__}; "
                          "the command line's --draft SOURCE loads it")
    if tokenizer is not None and draft_tokenizer is not None and tokenizer.fingerprint != draft_tokenizer.fingerprint:
        raise GptlabError(f"{name} uses another tokenizer ({draft_tokenizer.name}, fingerprint "
                          f"{draft_tokenizer.fingerprint}) than the model ({tokenizer.name}, {tokenizer.fingerprint}); "
                          "a draft must share the model's tokenizer")
    if draft.config.vocab_size != model.config.vocab_size:
        raise GptlabError(f"{name} has a {draft.config.vocab_size}-token vocabulary and the model "
                          f"{model.config.vocab_size}; a draft must share the model's tokenizer")
    if draft.config.context_length < model.config.context_length:
        raise GptlabError(f"{name} sees {draft.config.context_length} tokens of context, fewer than the model's "
                          f"{model.config.context_length}; use a draft with at least the model's context")
    if next(draft.parameters()).device != next(model.parameters()).device:
        raise GptlabError(f"{name} is on {next(draft.parameters()).device} and the model on "
                          f"{next(model.parameters()).device}; load both on one device")


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
    *,
    num_beams: int = 1,
    length_penalty: float | None = None,
    early_stopping: bool | str | None = None,
    num_return_sequences: int = 1,
    **options,
) -> torch.Tensor:
    """Token ids (B, T) or (T,) to (B, T + new): the prompt with the generated tokens appended.

    ``options``: ``stream``'s keyword-only settings (penalties, min-p, draft, prompt lookup). With
    ``num_return_sequences`` N each prompt row gives N rows. With ``num_beams`` > 1 (one prompt): the best
    N beams, best first, (N, T + longest), a shorter one padded with ``eos_id`` as Hugging Face does.
    """
    squeeze = ids.dim() == 1 and num_return_sequences == 1
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    if num_beams > 1:
        out = _generate_beams(model, ids, max_new_tokens, top_k, top_p, eos_id, use_cache, num_beams, length_penalty,
                              early_stopping, num_return_sequences, temperature=temperature, **options)
        return out[0] if squeeze else out
    check_decoding(temperature, top_k, top_p, num_beams, length_penalty, early_stopping)  # refuse beam settings
    new = list(stream(model, ids, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, seed,
                      num_return_sequences=num_return_sequences, **options))
    if num_return_sequences > 1:
        ids = ids.repeat_interleave(num_return_sequences, dim=0)
    out = torch.cat([ids.to(new[0].device if new else ids.device), *(t.unsqueeze(1) for t in new)], dim=1)
    return out[0] if squeeze else out


def _generate_beams(model: GPTModel, ids: torch.Tensor, max_new_tokens: int, top_k: int | None, top_p: float | None,
                    eos_id: int | None, use_cache: bool, num_beams: int, length_penalty: float | None,
                    early_stopping: bool | str | None, num_return_sequences: int, **options) -> torch.Tensor:
    if ids.size(0) != 1:
        raise GptlabError(f"beam search takes one prompt at a time, got a batch of {ids.size(0)}")
    hypotheses = _beam_hypotheses(model, ids[0], max_new_tokens, num_beams, length_penalty, early_stopping,
                                  num_return_sequences, eos_id, None, use_cache, top_k=top_k, top_p=top_p, **options)
    width = max(len(h.tokens) for h in hypotheses)
    out = torch.full((len(hypotheses), ids.size(1) + width), eos_id if eos_id is not None else -1, dtype=ids.dtype)
    out[:, : ids.size(1)] = ids
    for row, h in enumerate(hypotheses):
        out[row, ids.size(1) : ids.size(1) + len(h.tokens)] = torch.tensor(h.tokens, dtype=ids.dtype)
    return out.to(next(model.parameters()).device)


def _beam_hypotheses(model: GPTModel, ids: torch.Tensor, max_new_tokens: int, num_beams: int,
                     length_penalty: float | None, early_stopping: bool | str | None, num_return_sequences: int,
                     eos_id: int | None, stop: Callable[[list[int]], bool] | None, use_cache: bool, *,
                     temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                     min_p: float | None = None, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                     frequency_penalty: float = 0.0, draft: GPTModel | None = None, draft_tokens: int = 4,
                     prompt_lookup: int | None = None, seed: int | None = None) -> list[Hypothesis]:
    """Checked settings, then ``gptlab.beam.beam_search`` on the prompt ``ids`` (T,). ``seed`` is unused: greedy."""
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    check_decoding(temperature, top_k, top_p, num_beams, length_penalty, early_stopping, num_return_sequences,
                   repetition_penalty, presence_penalty, frequency_penalty, min_p, draft is not None, draft_tokens,
                   prompt_lookup)
    device = next(model.parameters()).device
    penalties = Penalties.make(ids.reshape(1, -1).to(device), model.config.vocab_size, repetition_penalty,
                               presence_penalty, frequency_penalty)
    return beam_search(model, ids, max_new_tokens, num_beams, 1.0 if length_penalty is None else length_penalty,
                       early_stopping_value(early_stopping) or False, num_return_sequences,
                       eos_id, stop, use_cache, penalties)


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
    *,
    num_beams: int = 1,
    length_penalty: float | None = None,
    early_stopping: bool | str | None = None,
    num_return_sequences: int = 1,
    speculation: SpeculationStats | None = None,
    **options,
) -> Iterator[str]:
    """Yield pieces of the continuation of ``prompt`` as soon as they are final.

    Text is held back while it could still be the start of a stop string or of a multi-byte character,
    so a caller printing the pieces never shows a stop string or a broken character.
    ``stats``, when given, receives the token counts and the finish reason (a server reports them).
    ``options``: ``stream``'s keyword-only settings (penalties, min-p, ``draft``: a loaded model, prompt lookup).
    Beam search (``num_beams`` > 1) knows its answer only at the end, so that comes as one piece; a stop
    string or end-of-text finishes a beam. One answer only: for several, ``generate_texts``.
    """
    if num_return_sequences != 1:
        raise GptlabError(f"stream_text streams one answer; for num-return-sequences {num_return_sequences} "
                          "use generate_texts")
    if isinstance(options.get("draft"), (str, bytes)) or hasattr(options.get("draft"), "__fspath__"):
        raise GptlabError(f"draft must be a loaded model: pass gptlab.load({str(options['draft'])!r})[0], "
                          "not its source (the command line's --draft loads it)")
    ids = encode_prompt(tokenizer, prompt, model.config.context_length)
    stats = stats if stats is not None else TextStats()
    stats.prompt_tokens = len(ids)
    eos = tokenizer.eot_id if stop_at_eot else None
    if num_beams > 1:
        best = _beam_hypotheses(model, torch.tensor(ids), max_new_tokens, num_beams, length_penalty, early_stopping,
                                1, eos, stop_check(tokenizer, stop), use_cache, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, **options)[0]
        yield "".join(decode_stream(best.tokens, tokenizer, stop, eos, stats))
        return
    check_decoding(temperature, top_k, top_p, num_beams, length_penalty, early_stopping)  # refuse beam settings
    # closing: when the caller stops early, the model's stream ends now (its cache freed, train mode restored)
    with closing(stream(model, torch.tensor([ids]), max_new_tokens, temperature, top_k, top_p, eos, use_cache,
                        seed, speculation=speculation, **options)) as tokens:
        yield from decode_stream((int(token[0]) for token in tokens), tokenizer, stop, eos, stats)


def stop_check(tokenizer: Tokenizer, stop: Sequence[str]) -> Callable[[list[int]], bool] | None:
    """For beam search: whether a beam's new tokens now contain a stop string (None when there are none).

    Only the tail is decoded: a token is at least one byte and a character at most four, so a stop string
    of L characters lies within the last 4L + 1 tokens (the one extra for a character split at the cut).
    """
    stop = [s for s in stop if s]
    if not stop:
        return None
    reach = 4 * max(len(s) for s in stop) + 1
    return lambda new: any(s in tokenizer.decode(new[-reach:]) for s in stop)


def generate_texts(model: GPTModel, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 50,
                   num_return_sequences: int = 1, seed: int | None = None, stop: Sequence[str] = (),
                   stop_at_eot: bool = True, use_cache: bool = True, *, num_beams: int = 1,
                   length_penalty: float | None = None, early_stopping: bool | str | None = None,
                   **options) -> list[str]:
    """``num_return_sequences`` continuations of ``prompt``: the best beams, best first, with ``num_beams`` > 1;
    else independent samples, the i-th drawn with ``seed + i`` (as the server's choices are). Same options as
    ``stream_text``."""
    if num_beams > 1:
        ids = encode_prompt(tokenizer, prompt, model.config.context_length)
        eos = tokenizer.eot_id if stop_at_eot else None
        hypotheses = _beam_hypotheses(model, torch.tensor(ids), max_new_tokens, num_beams, length_penalty,
                                      early_stopping, num_return_sequences, eos, stop_check(tokenizer, stop),
                                      use_cache, seed=seed, **options)
        return ["".join(decode_stream(h.tokens, tokenizer, stop, eos)) for h in hypotheses]
    check_decoding(options.get("temperature", 0.0), options.get("top_k"), options.get("top_p"), num_beams,
                   length_penalty, early_stopping, num_return_sequences)
    return ["".join(stream_text(model, tokenizer, prompt, max_new_tokens, seed=None if seed is None else seed + i,
                                stop=stop, stop_at_eot=stop_at_eot, use_cache=use_cache, **options))
            for i in range(num_return_sequences)]


def decode_stream(token_ids: Iterable[int], tokenizer: Tokenizer, stop: Sequence[str] = (),
                  eos_id: int | None = None, stats: TextStats | None = None) -> Iterator[str]:
    """Yield the text of ``token_ids`` in pieces as soon as they are final: the pieces join to
    ``tokenizer.decode(ids)``, cut before the first stop string or ``eos_id`` (which ends the text, unshown).

    ``TextDecoder`` does the work, one token at a time; this pulls the tokens for it.
    """
    decoder = TextDecoder(tokenizer, stop, eos_id, stats)
    for token_id in token_ids:
        piece = decoder.push(token_id)
        if piece:
            yield piece
        if decoder.done:
            return
    tail = decoder.flush()
    if tail:
        yield tail


class TextDecoder:
    """``decode_stream`` pushed one token at a time (the batched decoder feeds many at once): ``push`` returns
    the text that became final ("" when none), ``done`` turns true at end-of-text or a stop string, and
    ``flush`` returns what is still held back once the tokens run out.

    Each token is decoded once (``_ContinuationText``), and only the text not yet returned, plus the last
    ``max(len(stop))`` characters a stop string could start in, is searched: linear in the length.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), eos_id: int | None = None,
                 stats: TextStats | None = None) -> None:
        self.stop = [s for s in stop if s]
        self.eos_id = eos_id
        self.stats = stats if stats is not None else TextStats()
        self.stats.completion_tokens, self.stats.finish_reason = 0, "length"
        self.holdback = max((len(s) for s in self.stop), default=1) - 1  # characters that may start a stop string
        self.reach = max((len(s) for s in self.stop), default=0)  # how far back the stop search starts
        self.text = _ContinuationText(tokenizer)
        self.emitted = 0  # characters returned so far
        self.done = False

    def push(self, token_id: int) -> str:
        """Take the next token; the text now final (at end-of-text: all that was held back)."""
        text, emitted = self.text, self.emitted
        self.stats.completion_tokens += 1
        if self.eos_id is not None and token_id == self.eos_id:
            self.stats.finish_reason, self.done = "stop", True
            return self.flush()
        text.add(token_id)
        cut = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stats.finish_reason, self.done = "stop", True
            self.emitted = len(text)  # nothing after the stop string is ever shown
            return text.slice(emitted, cut) if cut > emitted else ""
        safe = len(text) - self.holdback
        if text.endswith_replacement():  # an incomplete UTF-8 sequence: wait for the next token
            safe = min(safe, len(text) - 1)
        if safe <= emitted:
            return ""
        self.emitted = safe
        piece = text.slice(emitted, safe)
        text.forget_before(safe - self.reach)
        return piece

    def flush(self) -> str:
        """The text held back so far (a possible stop string's start, a pending character)."""
        piece = self.text.slice(self.emitted, len(self.text)) if len(self.text) > self.emitted else ""
        self.emitted = len(self.text)
        return piece


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
