"""From a model's logits to the next token: penalties, then temperature and the filters, then a draw.

Every decoder (plain, beam search, speculative) goes through the same steps, in this order:

    1. repetition_penalty   Hugging Face's (the CTRL paper's): the logit of every token already in the
                            text, prompt included, is divided by it when positive, multiplied when negative
    2. presence_penalty     OpenAI's: ``logit[j] -= presence * (count[j] > 0) + frequency * count[j]``,
       frequency_penalty    where ``count[j]`` is how often token j was generated (the prompt not counted)
    3. temperature          0 is greedy: the argmax of the penalised logits (the filters below change no argmax)
    4. top_k                keep the k most likely tokens
    5. top_p                keep the smallest set holding top_p of the probability
    6. min_p                keep tokens with at least min_p times the top token's probability
    7. a draw from what is left

Steps 3-6 are Hugging Face's warpers in Hugging Face's order, so a setting means what it means there.
"""
from __future__ import annotations

import torch


class Penalties:
    """What the penalties need to remember per row: which tokens the text holds and how often each was generated.

    Kept as (B, V) tables updated one token at a time, so applying them costs the same at any length.
    """

    def __init__(self, prompt: torch.Tensor, vocab_size: int, repetition_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> None:
        B = prompt.size(0)
        self.repetition, self.presence, self.frequency = repetition_penalty, presence_penalty, frequency_penalty
        self.seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=prompt.device)  # prompt + generated
        self.seen.scatter_(1, prompt, True)
        self.counts = torch.zeros(B, vocab_size, dtype=torch.float32, device=prompt.device)  # generated only

    @classmethod
    def make(cls, prompt: torch.Tensor, vocab_size: int, repetition_penalty: float = 1.0,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> "Penalties | None":
        """The tables, or None when every penalty is off (then nothing is tracked)."""
        if repetition_penalty == 1.0 and presence_penalty == 0.0 and frequency_penalty == 0.0:
            return None
        return cls(prompt, vocab_size, repetition_penalty, presence_penalty, frequency_penalty)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The penalised logits (B, V), as float32."""
        logits = logits.float()
        if self.repetition != 1.0:
            penalised = torch.where(logits < 0, logits * self.repetition, logits / self.repetition)
            logits = torch.where(self.seen, penalised, logits)
        if self.frequency != 0.0:
            logits = logits - self.counts * self.frequency
        if self.presence != 0.0:
            logits = logits - (self.counts > 0).float() * self.presence
        return logits

    def add(self, tokens: torch.Tensor) -> None:
        """Record one new token per row, (B,)."""
        rows = tokens.unsqueeze(1)
        self.seen.scatter_(1, rows, True)
        self.counts.scatter_add_(1, rows, torch.ones_like(rows, dtype=self.counts.dtype))

    def select(self, rows: torch.Tensor) -> "Penalties":
        """The tables of ``rows`` (beam search: each surviving beam takes its parent's history)."""
        new = object.__new__(Penalties)
        new.repetition, new.presence, new.frequency = self.repetition, self.presence, self.frequency
        new.seen, new.counts = self.seen.index_select(0, rows), self.counts.index_select(0, rows)
        return new

    def copy(self) -> "Penalties":
        return self.select(torch.arange(self.seen.size(0), device=self.seen.device))


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None) -> torch.Tensor:
    """Logits (B, V) divided by ``temperature`` (> 0) with the tokens that top-k, top-p and min-p drop at -inf."""
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
    if min_p is not None and min_p > 0.0:
        probs = logits.softmax(dim=-1)
        # the top token has exactly the top probability, so it always stays (HF's min_tokens_to_keep=1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None) -> torch.Tensor:
    """The distribution the next token is drawn from, (B, V); temperature 0 puts all of it on the argmax."""
    if temperature <= 0.0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    return filter_logits(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                min_p: float | None = None) -> torch.Tensor:
    """Pick the next token from (already penalised) logits (B, V); returns (B,). Temperature 0 is greedy."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
