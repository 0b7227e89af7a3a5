"""The GPT-2 architecture, top to bottom.

Module names mirror OpenAI's GPT-2 checkpoint (``wte``, ``wpe``, ``h.N.attn.c_attn`` ...) so that
importing pretrained weights is a key map, not a translation. Shapes: B batch, T time (tokens),
C channels (``n_embd``), nh heads, hs head size, V vocabulary. ``CPULinear`` (``gptlab.linear``) is
``nn.Linear`` with faster CPU kernels: read it as ``nn.Linear`` here; ``lm_head_loss`` (``gptlab.loss``)
is the head's cross-entropy, computed without the whole logits where it can be.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.config import PRESETS, GPTConfig  # noqa: F401  (PRESETS: re-exported for the API)
from gptlab.errors import GptlabError
from gptlab.linear import CPULinear
from gptlab.loss import lm_head_loss


class KVCache:
    """Preallocated keys and values for every layer, so decoding writes in place instead of concatenating."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype) -> None:
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        # empty, not zeros: only positions < pos are ever read, and zeroing costs a full write of the cache;
        # one allocation each, kept as per-layer views (picking a layer is then a tuple lookup, not an op)
        k, v = torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype)
        self.k = tuple(k[layer] for layer in range(config.n_layer))  # n_layer x (B, nh, max_len, hs)
        self.v = tuple(v[layer] for layer in range(config.n_layer))
        self.pos = 0  # number of positions already filled
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, nh, T, hs) keys/values at the current position; return everything cached so far."""
        start, T = self.pos, k.size(2)
        k_all, v_all = self.k[layer], self.v[layer]  # (B, nh, max_len, hs)
        k_all.narrow(2, start, T).copy_(k)  # narrow + copy_: two ops where slice assignment takes six
        v_all.narrow(2, start, T).copy_(v)
        return k_all.narrow(2, 0, start + T), v_all.narrow(2, 0, start + T)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.n_head, self.layer = config.n_head, layer
        self.c_attn = CPULinear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)  # fused q, k, v
        self.c_proj = CPULinear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, T, hs)
        mask, is_causal = None, T > 1
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, nh, past + T, hs)
            if past > 0 and T > 1:
                # SDPA's is_causal aligns the mask top-left; new queries sit at the bottom right.
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                is_causal = False
            elif past > 0:
                is_causal = False  # one new query may look at every cached position
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

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
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

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) to final normalised hidden states (B, T, C)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.context_length:
            raise GptlabError(
                f"sequence of {start + T} tokens exceeds the model's context length {self.config.context_length}"
            )
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x, cache)
        if cache is not None:
            cache.pos += T
        return self.ln_f(x)  # (B, T, C)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: KVCache | None = None,
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
