"""The GPT-2 architecture, top to bottom.

Module names mirror OpenAI's GPT-2 checkpoint (``wte``, ``wpe``, ``h.N.attn.c_attn`` ...) so that
importing pretrained weights is a key map, not a translation. Shapes: B batch, T time (tokens),
C channels (``n_embd``), nh heads, hs head size, V vocabulary. ``CPULinear`` (``gptlab.linear``) is
``nn.Linear`` with faster CPU kernels: read it as ``nn.Linear`` here; ``lm_head_loss`` (``gptlab.loss``)
is the head's cross-entropy, computed without the whole logits where it can be.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.config import PRESETS, GPTConfig  # noqa: F401  (PRESETS: re-exported for the API)
from gptlab.errors import GptlabError
from gptlab.linear import CPULinear
from gptlab.loss import lm_head_loss


def layer_buffers(alloc, config: GPTConfig, rows: int, max_len: int, device, dtype) -> tuple[tuple, tuple]:
    """Keys and values for every layer: one allocation each, kept as per-layer views (picking a layer is then
    a tuple lookup, not an op): n_layer x (rows, nh, max_len, hs) each."""
    shape = (config.n_layer, rows, config.n_head, max_len, config.n_embd // config.n_head)
    k, v = alloc(shape, device=device, dtype=dtype), alloc(shape, device=device, dtype=dtype)
    return tuple(k[layer] for layer in range(config.n_layer)), tuple(v[layer] for layer in range(config.n_layer))


class KVCache:
    """Preallocated keys and values for every layer, so decoding writes in place instead of concatenating."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype) -> None:
        # empty, not zeros: only positions < pos are ever read, and zeroing costs a full write of the cache
        self.k, self.v = layer_buffers(torch.empty, config, batch_size, max_len, device, dtype)
        self.pos = 0  # number of positions already filled
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, nh, T, hs) keys/values at the current position; return everything cached so far."""
        start, T = self.pos, k.size(2)
        k_all, v_all = self.k[layer], self.v[layer]  # (B, nh, max_len, hs)
        k_all.narrow(2, start, T).copy_(k)  # narrow + copy_: two ops where slice assignment takes six
        v_all.narrow(2, start, T).copy_(v)
        return k_all.narrow(2, 0, start + T), v_all.narrow(2, 0, start + T)

    @classmethod
    def over(cls, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> "KVCache":
        """A cache writing into existing per-layer stores (B, nh, max_len, hs): a row of a ``RaggedKVCache``."""
        cache = object.__new__(cls)
        cache.k, cache.v, cache.pos, cache.max_len = tuple(k), tuple(v), 0, k[0].size(2)
        return cache

    # the model's side: where the new tokens sit, and what they may attend to
    def positions(self, T: int, device) -> tuple[torch.Tensor, int]:
        """The new tokens' positions (T,) and the sequence length they make."""
        return torch.arange(self.pos, self.pos + T, device=device), self.pos + T

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys and values; return all keys, values, the attention mask and SDPA's is_causal."""
        past, T = self.pos, k.size(2)
        k, v = self.update(layer, k, v)  # (B, nh, past + T, hs)
        if past > 0 and T > 1:
            # SDPA's is_causal aligns the mask top-left; new queries sit at the bottom right.
            return k, v, torch.ones(T, past + T, dtype=torch.bool, device=k.device).tril(diagonal=past), False
        return k, v, None, T > 1  # past > 0: one new query may look at every cached position

    def advance(self, T: int) -> None:
        self.pos += T


class RaggedKVCache:
    """Keys and values of sequences of different lengths, one row each: continuous batching's cache.

    Row r holds its own sequence left-aligned, ``lengths[r]`` positions filled. A decoding step feeds one
    token per row: each row's token takes position ``lengths[r]`` (its own position embedding too), and
    attends over the stored span through a mask of each row's valid positions. Left alignment keeps a row's
    keys where a batch-1 cache keeps them, so nothing is recomputed or shifted when rows of other lengths
    join or leave; padding past a row's length is masked, never computed. The rows in use are always
    0..n-1 (``remove`` moves the last row into the gap), and a step of n token ids uses exactly those.
    Prefill goes through ``view(r, n)``: a plain ``KVCache`` over those rows, the path of an ordinary batch.
    """

    def __init__(self, config: GPTConfig, rows: int, max_len: int, device, dtype) -> None:
        # zeros, not empty: a masked position still enters the product (0 x NaN is NaN), so it must be finite
        self.k, self.v = layer_buffers(torch.zeros, config, rows, max_len, device, dtype)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)  # positions filled, per row
        self.rows, self.max_len = rows, max_len
        self._step: tuple[torch.Tensor, int, torch.Tensor] | None = None  # this step's positions, span, mask

    def view(self, r: int, n: int = 1) -> KVCache:
        """A plain cache over rows r..r+n-1, empty: new sequences are prefilled through it (``lengths`` follows)."""
        return KVCache.over([k[r : r + n] for k in self.k], [v[r : r + n] for v in self.v])

    def copy_row(self, dst: int, src: int, other: "RaggedKVCache | None" = None) -> None:
        """Row ``src`` of ``other`` (default: this cache) into row ``dst``, its filled positions only."""
        other = other or self
        n = int(other.lengths[src])
        for mine, theirs in zip((*self.k, *self.v), (*other.k, *other.v)):
            mine[dst, :, :n].copy_(theirs[src, :, :n])
        self.lengths[dst] = n

    def remove(self, r: int, used: int) -> None:
        """Free row ``r`` of the ``used`` rows in use: the last one moves into it."""
        if r != used - 1:
            self.copy_row(r, used - 1)
        self.lengths[used - 1] = 0

    # the model's side, for one token per row
    def positions(self, T: int, device) -> tuple[torch.Tensor, int]:
        if T != 1:
            raise GptlabError("a ragged cache decodes one token per row; prefill rows through view(r, n)")
        if self._step is None:
            raise GptlabError("RaggedKVCache.begin(rows) comes before each decoding step")
        return self._step[0].unsqueeze(1), self._step[1]  # (n, 1): each row's own position; the longest row

    def begin(self, n: int) -> None:
        """Set up a step over rows 0..n-1: their positions, the span to attend over, the valid-position mask."""
        lengths = self.lengths[:n]  # (n,)
        span = int(lengths.max()) + 1
        if span > self.max_len:
            raise GptlabError(f"a row would need {span} positions; the ragged cache holds {self.max_len}")
        valid = torch.arange(span, device=lengths.device) <= lengths.unsqueeze(1)  # (n, span)
        self._step = (lengths, span, valid[:, None, None, :])  # mask (n, 1, 1, span): one query per row

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        lengths, span, mask = self._step
        n, rows = k.size(0), torch.arange(k.size(0), device=k.device)
        k_all, v_all = self.k[layer][:n], self.v[layer][:n]  # (n, nh, max_len, hs)
        k_all[rows, :, lengths] = k[:, :, 0]  # each row's new key at its own position: (n, nh, hs)
        v_all[rows, :, lengths] = v[:, :, 0]
        return k_all[:, :, :span], v_all[:, :, :span], mask, False

    def advance(self, T: int) -> None:
        lengths = self._step[0]
        lengths += T  # a view of self.lengths: the rows just decoded grow by one
        self._step = None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.n_head, self.layer = config.n_head, layer
        self.c_attn = CPULinear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)  # fused q, k, v
        self.c_proj = CPULinear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | RaggedKVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, T, hs)
        mask, is_causal = None, T > 1
        if cache is not None:
            k, v, mask, is_causal = cache.attend(self.layer, k, v)  # k, v: (B, nh, cached + T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = CPULinear(config.n_embd, 4 * config.n_embd)
        self.c_proj = CPULinear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, 4C); GPT-2 used the tanh approximation
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | RaggedKVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPTModel(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context_length, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.lm_head = CPULinear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # one matrix for reading and writing tokens
        if config.init_style == "gpt2":  # "book": PyTorch's defaults, as the LLMs-from-scratch book's model
            self.apply(self._init_weights)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by depth
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_dropout(self, p: float) -> None:
        """Change every dropout rate; dropout holds no weights, so a loaded model may train with another."""
        self.config = replace(self.config, dropout=p)
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            elif isinstance(module, CausalSelfAttention):
                module.dropout = p

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied head is counted once

    def _target_logprobs(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) at each position of hidden states ``x`` (B, T, C); 0 where the target is -100. The head
        runs only where there is a target: in a DPO pair the prompt and the padding are most positions."""
        scored = targets != -100  # (B, T)
        logits = self.lm_head(x[scored])  # (M, V), M = the scored positions of all rows
        token_logps = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)  # (B, T)
        token_logps[scored] = -F.cross_entropy(logits.float(), targets[scored], reduction="none")  # (M,)
        return token_logps

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | RaggedKVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) to final normalised hidden states (B, T, C)."""
        B, T = idx.shape
        # pos: (T,), or (B, 1) for a ragged cache (each row at its own position); end: the longest sequence
        pos, end = cache.positions(T, idx.device) if cache is not None else (torch.arange(T, device=idx.device), T)
        if end > self.config.context_length:
            raise GptlabError(f"sequence of {end} tokens exceeds the model's context length {self.config.context_length}")
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x, cache)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)  # (B, T, C)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | RaggedKVCache | None = None,
                last_only: bool = False, per_token: bool = False) -> torch.Tensor:
        """Token ids (B, T) to logits (B, T, V), or with ``targets`` (B, T) to the mean next-token loss.

        Targets of -100 are ignored (padding, masked prompts). ``last_only`` computes only the final
        position's logits (B, 1, V). ``per_token`` (with ``targets``): each target's log-probability instead
        (B, T), 0 where ignored (DPO scores sequences with it). Both losses go through ``forward``, so that a
        DDP or FSDP wrapper sees the whole computation.
        """
        if isinstance(targets, KVCache):
            raise TypeError("GPTModel's second argument is the targets: pass the cache by name, "
                            "model(idx, cache=cache)")
        x = self.hidden_states(idx, cache)  # (B, T, C)
        if targets is not None and per_token:
            return self._target_logprobs(x, targets)  # (B, T)
        if targets is not None:
            return lm_head_loss(x, self.lm_head, targets)  # a scalar
        if last_only:
            x = x[:, -1:, :]  # the head is the costliest matmul for small models: skip unused positions
        return self.lm_head(x)  # (B, T, V)
