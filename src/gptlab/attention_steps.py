"""Self-attention built up step by step, as chapter 3 of the LLMs-from-scratch book does it.

Each step adds one idea to the one before; read them in order:

    simple_self_attention      no weights: every token mixes in the tokens that resemble it
    SelfAttention_v1           trainable query, key and value matrices (plain ``nn.Parameter``s)
    SelfAttention_v2           the same with ``nn.Linear`` layers (better initialisation, optional bias)
    CausalAttention            a mask hides the future; dropout on the attention weights; a batch dimension
    MultiHeadAttentionWrapper  several causal heads side by side, outputs concatenated
    MultiHeadAttention         the same heads from one projection, split by a reshape, plus an output projection

Names and shapes follow the book (``d_in``, ``d_out``, ``W_query`` ...), so a book model's weights load into
these classes as they are. ``as_causal_self_attention`` turns the last step into gptlab's production
``CausalSelfAttention`` (``gptlab.model``), which is the same computation made fast: one fused q/k/v
matmul and PyTorch's fused ``scaled_dot_product_attention``. Teaching code: the model never uses it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.model import CausalSelfAttention, GPTConfig


def simple_self_attention(inputs: torch.Tensor) -> torch.Tensor:
    """Context vectors of (T, d) inputs with no trainable weights (the book's section 3.3).

    Each token's score for every other token is their dot product (how alike they are); a softmax turns
    a row of scores into weights that sum to 1; the context vector is the weighted sum of the inputs.
    """
    scores = inputs @ inputs.T  # (T, T): scores[i, j] = x_i . x_j
    weights = torch.softmax(scores, dim=-1)  # (T, T), each row sums to 1
    return weights @ inputs  # (T, d)


def scaled_softmax(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Softmax of scores divided by sqrt(d_k): without it, large dot products make the softmax nearly
    one-hot and its gradients vanish."""
    return torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)


class SelfAttention_v1(nn.Module):
    """Self-attention with trainable weights, for one sequence (T, d_in).

    Three matrices project each input into a query (what it looks for), a key (what it offers) and a
    value (what it passes on). Attention compares queries with keys and averages the values.
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        # torch.rand, in this order, as in the book: the same seed gives the book's weights
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        queries, keys = x @ self.W_query, x @ self.W_key  # (T, d_out) each
        return scaled_softmax(queries @ keys.T, keys)  # (T, T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention_weights(x) @ (x @ self.W_value)  # (T, d_out)


class SelfAttention_v2(nn.Module):
    """``SelfAttention_v1`` with ``nn.Linear`` projections: a better initialisation, and an optional bias.

    ``nn.Linear`` stores its weight transposed, (d_out, d_in): v1 with ``W_query = v2.W_query.weight.T``
    computes exactly what v2 does.
    """

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        queries, keys = self.W_query(x), self.W_key(x)  # (T, d_out) each
        return scaled_softmax(queries @ keys.T, keys)  # (T, T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention_weights(x) @ self.W_value(x)  # (T, d_out)


def causal_mask(context_length: int) -> torch.Tensor:
    """(T, T) booleans, True above the diagonal: the future positions a token must not see."""
    return torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)


class CausalAttention(nn.Module):
    """Self-attention for a language model, over a batch (B, T, d_in).

    A token may attend only to itself and to earlier tokens: scores of later positions are set to -inf
    before the softmax, so their weights are exactly 0 and each row still sums to 1. Dropout then zeroes
    random attention weights during training (and scales the rest by 1 / (1 - p)).
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False) -> None:
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # a buffer: moves with .to(device) but is not trained; in the state dict as in the book's, so
        # weights load both ways
        self.register_buffer("mask", causal_mask(context_length))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, T) weights before dropout; row i is how much token i takes from each token j <= i."""
        T = x.shape[1]
        queries, keys = self.W_query(x), self.W_key(x)  # (B, T, d_out) each
        scores = queries @ keys.transpose(1, 2)  # (B, T, T)
        scores = scores.masked_fill(self.mask[:T, :T], -torch.inf)  # hide the future
        return scaled_softmax(scores, keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.dropout(self.attention_weights(x))  # (B, T, T)
        return weights @ self.W_value(x)  # (B, T, d_out)


class MultiHeadAttentionWrapper(nn.Module):
    """``num_heads`` independent causal heads, each with its own weights; their outputs are concatenated,
    so the output is (B, T, num_heads * d_out). Clear, but one small matmul per head."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(x) for head in self.heads], dim=-1)  # (B, T, num_heads * d_out)


class MultiHeadAttention(nn.Module):
    """The wrapper's heads computed together: one (d_in, d_out) projection each for queries, keys and
    values, split into ``num_heads`` heads of ``d_out // num_heads`` by a reshape, so every head runs in
    one batched matmul. The heads' outputs are joined again and mixed by an output projection.

    Head h of this class is a ``CausalAttention`` whose weights are rows ``h*hd:(h+1)*hd`` of each
    projection (hd = head_dim): the same model as the wrapper, laid out for speed.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False) -> None:
        super().__init__()
        if d_out % num_heads:
            raise GptlabError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)  # mixes what the heads found
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", causal_mask(context_length))

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d_out) -> (B, num_heads, T, head_dim): the last dimension cut into heads."""
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_heads, T, T) weights before dropout, one causal pattern per head."""
        T = x.shape[1]
        queries, keys = self.split_heads(self.W_query(x)), self.split_heads(self.W_key(x))  # (B, nh, T, hd)
        scores = queries @ keys.transpose(2, 3)  # (B, nh, T, T): every head at once
        scores = scores.masked_fill(self.mask[:T, :T], -torch.inf)
        return scaled_softmax(scores, keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        weights = self.dropout(self.attention_weights(x))  # (B, nh, T, T)
        context = weights @ self.split_heads(self.W_value(x))  # (B, nh, T, hd)
        context = context.transpose(1, 2).reshape(B, T, self.d_out)  # heads side by side again: (B, T, d_out)
        return self.out_proj(context)


@torch.no_grad()
def as_causal_self_attention(mha: MultiHeadAttention) -> CausalSelfAttention:
    """gptlab's ``CausalSelfAttention`` holding ``mha``'s weights: in eval mode, the same outputs.

    Production fuses the three projections into one matmul: ``c_attn``'s weight is the query, key and
    value weights stacked, (3 * d_out, d_in), and ``c_proj`` is ``out_proj``. It needs d_in == d_out (a
    transformer block keeps its width) and a bias on all three projections or none.
    """
    d_in, d_out = mha.W_query.in_features, mha.d_out
    if d_in != d_out:
        raise GptlabError(f"CausalSelfAttention keeps the width: d_in ({d_in}) must equal d_out ({d_out})")
    has_bias = mha.W_query.bias is not None
    config = GPTConfig(n_embd=d_out, n_head=mha.num_heads, context_length=mha.mask.shape[0],
                       dropout=mha.dropout.p, qkv_bias=has_bias)
    attn = CausalSelfAttention(config, layer=0).to(mha.W_query.weight.device)
    projections = (mha.W_query, mha.W_key, mha.W_value)
    attn.c_attn.weight.copy_(torch.cat([p.weight for p in projections]))  # (3 * d_out, d_in)
    if has_bias:
        attn.c_attn.bias.copy_(torch.cat([p.bias for p in projections]))
    attn.c_proj.load_state_dict(mha.out_proj.state_dict())
    return attn.train(mha.training)
