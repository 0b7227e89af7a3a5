"""Continuous batching: many generations decoded as one batch, each joining and leaving between steps.

``ContinuousBatch`` is what ``gptlab serve`` runs. ``add`` queues a generation (a prompt and its own
``SamplingConfig``); each ``step``

    1. prefills the generations that joined since the last step, together (prompts of similar lengths,
       right-padded) into free rows of the ragged cache, and samples their first token (``prefill``: a
       server sends those before the decoding step);
    2. decodes one token for every other running generation as one (n, 1) batch over the ragged cache
       (``decode``),
       on the packed-weight path (``gptlab.linear.packed_weights``) while two rows or more run;
    3. drops the generations that finished; ``remove`` drops one at once (a client that left).

An empty batch holds its cache and packed weights until ``release_if_idle`` (``step`` calls it).

Why a ragged cache (``gptlab.model.RaggedKVCache``: one left-aligned row per generation, its own length
and position, a mask over each row's valid positions) rather than padding prompts to one length: a row's
keys stay where a batch-1 cache keeps them, so joining and leaving cost no recomputation or shifting, and
a generation's logits are those of the same request alone up to float rounding (the batched matmuls add in
another order: ~1e-6 here; tests/test_batching.py checks 1e-4 and the greedy tokens). The cache holds
rows for the running generations and positions for the longest of them (prompt + max_new_tokens, capped
at the context), grown when a newcomer needs more and freed when the batch empties.

Each generation keeps its own temperature, filters, penalties and seeded generator, and is sampled on its
own row of the logits, so its draws are those it would get alone. A generation that outgrows the context
window leaves the cache and recomputes its last ``context_length`` tokens each step, as ``stream`` does.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from gptlab.config import SamplingConfig
from gptlab.errors import GptlabError
from gptlab.generate import TextDecoder, TextStats, encode_prompt
from gptlab.linear import packed_weights
from gptlab.model import GPTModel, RaggedKVCache
from gptlab.sampling import Penalties, sample_next
from gptlab.tokenizer import Tokenizer

PREFILL_TOKENS = 32  # padded tokens per prefill group: a group's first tokens go out sooner than all of them
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
CACHE_LENGTH_STEP = 64  # the cache grows in positions by multiples of this (fewer reallocations)


@dataclass(eq=False)  # identity: two generations with the same tokens so far are still two
class BatchedStream:
    """One generation in the batch: its tokens, settings, text so far, and the events not yet taken."""

    ids: list[int]  # prompt + generated
    config: SamplingConfig
    decoder: TextDecoder
    logprobs: int | None = None  # None: no log-probabilities; k: also the k most likely alternatives
    stats: TextStats = field(default_factory=TextStats)
    penalties: Penalties | None = None
    generator: torch.Generator | None = None
    generated: int = 0
    done: bool = False
    last_logits: torch.Tensor | None = None  # (1, V): the (penalised) logits the last token was drawn from
    events: list[tuple] = field(default_factory=list)  # ("text", piece), ("logprobs", [entry]), ("finish", stats)

    def take(self) -> list[tuple]:
        """The events since the last call: ("logprobs", entries) before the ("text", piece) they belong to."""
        events, self.events = self.events, []
        return events

    def accept(self, logits: torch.Tensor, tokenizer: Tokenizer) -> None:
        """Draw the next token from this row's logits (1, V) and turn it into events."""
        c = self.config
        if self.penalties is not None:
            logits = self.penalties.apply(logits)
        token = int(sample_next(logits, c.temperature, c.top_k, c.top_p, self.generator, c.min_p)[0])
        self.last_logits = logits
        self.ids.append(token)
        self.generated += 1
        if self.penalties is not None:
            self.penalties.add(torch.tensor([token], device=logits.device))
        if self.logprobs is not None and token != self.decoder.eos_id:
            self.events.append(("logprobs", [token_logprobs(logits[0], token, self.logprobs, tokenizer)]))
        piece = self.decoder.push(token)
        if not self.decoder.done and self.generated >= c.max_new_tokens:
            piece += self.decoder.flush()
            self.decoder.done = True
        if piece:
            self.events.append(("text", piece))
        if self.decoder.done:
            self.finish()

    def finish(self) -> None:
        self.done = True
        self.events.append(("finish", self.stats))


def fits(rows: int, longest: int, tokens: int) -> bool:
    """Whether ``rows`` prompts padded to ``longest`` make a prefill group: padding at most half, and small."""
    return rows * longest <= min(2 * tokens, PREFILL_TOKENS)


def token_text(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    """A token's text (U+FFFD for part of a character, as OpenAI shows it) and its bytes."""
    decode_bytes = getattr(tokenizer, "decode_bytes", None)
    raw = decode_bytes([token]) if decode_bytes is not None else tokenizer.decode([token]).encode("utf-8")
    return raw.decode("utf-8", errors="replace"), list(raw)


def token_logprobs(logits: torch.Tensor, token: int, top: int, tokenizer: Tokenizer) -> dict:
    """OpenAI's per-token entry: the token's log-probability under the penalised logits (V,) before temperature
    and filters (what the model thinks, as vLLM reports it), and the ``top`` most likely tokens'."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (V,)
    text, raw = token_text(tokenizer, token)
    entry = {"token": text, "logprob": float(logp[token]), "bytes": raw, "top_logprobs": []}
    if top:
        values, indices = torch.topk(logp, top)
        for value, index in zip(values.tolist(), indices.tolist()):
            alt_text, alt_raw = token_text(tokenizer, index)
            entry["top_logprobs"].append({"token": alt_text, "logprob": value, "bytes": alt_raw})
    return entry


class ContinuousBatch:
    """Generations decoded together, one token each per ``step``; join with ``add``, leave with ``remove``."""

    def __init__(self, model: GPTModel, tokenizer: Tokenizer, pack_rows: int = 8) -> None:
        self.model, self.tokenizer, self.pack_rows = model.eval(), tokenizer, pack_rows
        self.device = next(model.parameters()).device
        self.joining: list[BatchedStream] = []  # prefilled at the next step
        self.running: list[BatchedStream] = []  # running[r] owns row r of the cache
        self.windowed: list[BatchedStream] = []  # past the context window: recomputed at batch 1 each step
        self.cache: RaggedKVCache | None = None
        self._packed = ExitStack()  # packed weight copies, held while two rows or more run
        self._packing = False
        self._newcomers: list[BatchedStream] = []  # prefilled this step: they drew their token already

    @property
    def size(self) -> int:
        """Generations in the batch (joining, running or windowed)."""
        return len(self.joining) + len(self.running) + len(self.windowed)

    def add(self, prompt: str, config: SamplingConfig, logprobs: int | None = None,
            stop_at_eot: bool = True) -> BatchedStream:
        """Queue a generation of ``prompt``; its events come from ``step`` on. Plain sampling only."""
        if config.num_beams != 1 or config.draft is not None or config.prompt_lookup is not None:
            raise GptlabError("continuous batching decodes plain sampling; for beam search, a draft model or "
                              "prompt lookup use gptlab.generate.stream_text")
        if config.num_return_sequences != 1:
            raise GptlabError("add one generation per answer (num_return_sequences 1), each with its own seed")
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise GptlabError(f"top logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs}")
        ids = encode_prompt(self.tokenizer, prompt, self.model.config.context_length)
        eos = self.tokenizer.eot_id if stop_at_eot else None
        stats = TextStats(prompt_tokens=len(ids))
        stream = BatchedStream(ids, config, TextDecoder(self.tokenizer, config.stop, eos, stats), logprobs, stats)
        stream.penalties = Penalties.make(torch.tensor([ids], device=self.device), self.model.config.vocab_size,
                                          config.repetition_penalty, config.presence_penalty, config.frequency_penalty)
        if config.seed is not None:
            stream.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        if config.max_new_tokens == 0:
            stream.finish()
        else:
            self.joining.append(stream)
        return stream

    def remove(self, stream: BatchedStream) -> None:
        """Drop ``stream`` now (finished or not): its cache row is free for the next step."""
        if stream in self.running:
            r = self.running.index(stream)
            self.cache.remove(r, len(self.running))
            self.running[r] = self.running[-1]
            self.running.pop()
        for group in (self.joining, self.windowed):
            if stream in group:
                group.remove(stream)

    def step(self) -> None:
        """Prefill the newcomers, decode one token for the others, drop the finished; an empty batch lets go
        of its cache and packed weights (a server calls ``release_if_idle`` itself, once idle for a while)."""
        self.prefill()
        self.decode()
        self.release_if_idle()

    @torch.no_grad()
    def prefill(self, groups: int | None = None) -> None:
        """The newcomers' prompts into free rows, each drawing its first token, in groups of similar lengths
        (padding under half of what is computed, at most ``PREFILL_TOKENS`` padded tokens unless one prompt
        is longer); ``groups``: at most that many groups now (a server sends each group's tokens at once)."""
        joining = sorted(self.joining, key=lambda s: len(s.ids))
        done = 0
        while joining and (groups is None or done < groups):
            group = [joining.pop(0)]
            while joining and fits(len(group) + 1, len(joining[0].ids), sum(len(s.ids) for s in group + joining[:1])):
                group.append(joining.pop(0))
            self._prefill(group)
            self._newcomers += group
            done += 1
        self.joining = joining

    @torch.no_grad()
    def decode(self) -> None:
        """One token for every generation that was running before this step's prefill; drop the finished."""
        decoding = [s for s in self.running if s not in self._newcomers]
        if any(s in self._newcomers for s in self.running[: len(decoding)]):
            # a running row removed after prefill moved a newcomer into the rows the step reads
            raise GptlabError("remove() a running generation before prefill() or after decode(), not between")
        self._newcomers = []
        if decoding:
            self._decode(decoding)
        for stream in self.windowed:
            ctx = self.model.config.context_length
            logits = self.model(torch.tensor([stream.ids[-ctx:]], device=self.device), last_only=True)[:, -1]
            stream.accept(logits, self.tokenizer)
        for stream in [s for s in self.running if len(s.ids) > self.model.config.context_length]:
            self.remove(stream)  # outgrew the window: from now on recomputed, as stream() does
            self.windowed.append(stream)
        for stream in [s for s in (*self.running, *self.windowed) if s.done]:
            self.remove(stream)

    def _prefill(self, group: list[BatchedStream]) -> None:
        """Prompts into rows r.., right-padded to the longest: causal attention never lets a real token see
        the padding after it, and positions start at 0 in every row, so each row is its prompt alone."""
        r, k = len(self.running), len(group)
        self._make_room(r + k, max(self._length_needed(s) for s in group))
        self.running += group
        lengths = torch.tensor([len(s.ids) for s in group], device=self.device)  # (k,)
        ids = torch.zeros(k, int(lengths.max()), dtype=torch.long, device=self.device)  # (k, P)
        for i, s in enumerate(group):
            ids[i, : len(s.ids)] = torch.tensor(s.ids)
        hidden = self.model.hidden_states(ids, cache=self.cache.view(r, k))  # (k, P, C)
        logits = self.model.lm_head(hidden[torch.arange(k), lengths - 1])  # (k, V): each prompt's last position
        self.cache.lengths[r : r + k] = lengths
        for i, s in enumerate(group):
            s.accept(logits[i : i + 1], self.tokenizer)

    def _decode(self, decoding: list[BatchedStream]) -> None:
        n = len(decoding)  # rows 0..n-1: the newcomers were appended after them
        if n >= 2 and not self._packing:
            self._packed.enter_context(packed_weights(self.model, self.pack_rows))
            self._packing = True
        last = torch.tensor([[s.ids[-1]] for s in decoding], device=self.device)  # (n, 1)
        self.cache.begin(n)
        logits = self.model(last, cache=self.cache, last_only=True)[:, -1]  # (n, V)
        for r, stream in enumerate(decoding):
            stream.accept(logits[r : r + 1], self.tokenizer)

    def _length_needed(self, stream: BatchedStream) -> int:
        return min(self.model.config.context_length, len(stream.ids) + stream.config.max_new_tokens)

    def _make_room(self, rows: int, length: int) -> None:
        """A cache of at least ``rows`` rows and ``length`` positions, the running rows copied over if it grows."""
        old = self.cache
        if old is not None and old.rows >= rows and old.max_len >= length:
            return
        ctx = self.model.config.context_length
        length = min(ctx, CACHE_LENGTH_STEP * math.ceil(max(length, old.max_len if old else 0) / CACHE_LENGTH_STEP))
        rows = max(rows, old.rows if old else 0)
        self.cache = RaggedKVCache(self.model.config, rows, length, self.device, self.model.wte.weight.dtype)
        for r in range(len(self.running)):
            self.cache.copy_row(r, r, old)

    def release_if_idle(self) -> None:
        """With nothing to decode: drop the cache and the packed weight copies (packing again costs ~0.1 s at
        the 124M shape, so a server keeps them over the gap between one request and the next)."""
        if not self.running and not self.joining and not self.windowed:
            self.cache = None  # an idle server holds no cache
            self._packed.close()
            self._packing = False

    def close(self) -> None:
        for stream in (*self.joining, *self.running, *self.windowed):
            stream.done = True
        self.joining, self.running, self.windowed = [], [], []
        self.release_if_idle()
