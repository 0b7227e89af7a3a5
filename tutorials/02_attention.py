# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Attention, step by step
#
# Attention lets each token build its vector from the tokens around it. The LLMs-from-scratch book's
# chapter 3 builds it in six steps, each adding one idea; `gptlab.attention_steps` holds those steps
# as short classes (tested equal to the book's on the same weights), and the last one turns into the
# `CausalSelfAttention` that gptlab's GPT runs.
#
# | step | what it adds |
# |---|---|
# | `simple_self_attention` | scores = dot products of the inputs; softmax; weighted sum |
# | `SelfAttention_v1` | trainable query, key and value projections |
# | `SelfAttention_v2` | the same with `nn.Linear` |
# | `CausalAttention` | a mask hides the future; dropout on the weights; batches |
# | `MultiHeadAttentionWrapper` | several heads side by side |
# | `MultiHeadAttention` | the heads as one projection, split by a reshape |

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import torch

from gptlab import attention_steps as steps

words = ["Your", "journey", "starts", "with", "one", "step"]
# the book's 3-d embeddings of these six words (section 3.3.1)
inputs = torch.tensor([[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
                       [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]])


def heatmap(ax, weights, title, labels=words):
    """Attention weights as an image: row i is how much token i takes from each token j."""
    image = ax.imshow(weights.detach(), cmap="viridis", vmin=0)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            bright = weights[i, j] > 0.6 * weights.max()  # dark text on the bright cells
            ax.text(j, i, f"{weights[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if bright else "white")
    return image


# %% [markdown]
# ## 1. Without trainable weights
#
# Score every pair of tokens by their dot product (alike vectors score high), turn each row of scores
# into weights that sum to 1 with a softmax, and replace each token by the weighted sum of all tokens:
# its *context vector*.

# %%
scores = inputs @ inputs.T
weights = torch.softmax(scores, dim=-1)
print("weights of 'journey':", weights[1].numpy().round(4), "sum", float(weights[1].sum()))
print(steps.simple_self_attention(inputs))  # the book's context vectors, rows 0..5
torch.testing.assert_close(steps.simple_self_attention(inputs), weights @ inputs)

# %% tags=["plot"]
fig, ax = plt.subplots(figsize=(4.5, 4))
fig.colorbar(heatmap(ax, weights, "simplified self-attention"), ax=ax)
plt.show()

# %% [markdown]
# ## 2. Trainable weights: queries, keys and values
#
# Three matrices project each token into a **query** (what it is looking for), a **key** (what it
# offers) and a **value** (what it hands over). Scores are query · key, divided by √d_k so that the
# softmax does not saturate as the dimension grows. v2 is v1 with `nn.Linear` layers, which store their
# weight transposed: v1 holding v2's weights, transposed, is v2 (the book's exercise 3.1).

# %%
torch.manual_seed(123)  # the book's seed: the same weights as its section 3.4
v1 = steps.SelfAttention_v1(d_in=3, d_out=2)
print(v1(inputs))

torch.manual_seed(789)
v2 = steps.SelfAttention_v2(d_in=3, d_out=2)
with torch.no_grad():
    for name in ("W_query", "W_key", "W_value"):
        getattr(v1, name).copy_(getattr(v2, name).weight.T)
torch.testing.assert_close(v1(inputs), v2(inputs))
print("v1 with v2's weights transposed gives v2's output")

# %% [markdown]
# ## 3. Causal attention: no peeking at the future
#
# A language model predicts the next token, so token *i* may only look at tokens 0..*i*. Scores above
# the diagonal become −∞ before the softmax: their weights are exactly 0 and each row still sums to 1.
# During training, dropout then zeroes random weights (scaling the rest by 1/(1−p)) so the model does
# not lean on single positions.

# %%
torch.manual_seed(123)
causal = steps.CausalAttention(d_in=3, d_out=2, context_length=6, dropout=0.5)
batch = torch.stack([inputs, inputs])  # (B=2, T=6, d_in=3)
causal_weights = causal.attention_weights(batch)[0]
print(causal(batch).shape)  # (2, 6, 2)

torch.manual_seed(123)
dropped = causal.dropout(causal_weights)  # what training does to the weights (the module is in train mode)

# %% tags=["plot"]
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
heatmap(axes[0], v2.attention_weights(inputs), "SelfAttention_v2: every token sees all")
heatmap(axes[1], causal_weights, "CausalAttention: the future masked")
heatmap(axes[2], dropped, "... and dropout p=0.5 while training")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Multi-head attention
#
# One head learns one way of relating tokens. The wrapper stacks `num_heads` causal heads and
# concatenates their outputs. `MultiHeadAttention` computes the same thing faster: one projection of
# width `d_out` for all heads, cut into heads of `d_out / num_heads` by a `view`, every head in one
# batched matmul, then an output projection mixes the heads.

# %%
torch.manual_seed(123)
wrapper = steps.MultiHeadAttentionWrapper(d_in=3, d_out=2, context_length=6, dropout=0.0, num_heads=2)
print("wrapper:", wrapper(batch).shape)  # (2, 6, 4): two heads of 2

torch.manual_seed(123)
mha = steps.MultiHeadAttention(d_in=3, d_out=4, context_length=6, dropout=0.0, num_heads=2)
print("multi-head:", mha(batch).shape)  # (2, 6, 4)
print("per-head weights:", mha.attention_weights(batch).shape)  # (B, heads, T, T)

# %% [markdown]
# The same model at GPT-2's size: 12 heads of 64 over a 768-wide input, on a sequence of 32 tokens.
# Each head finds its own pattern (these weights are random, untrained, so the patterns are too).

# %%
torch.manual_seed(0)
gpt2_mha = steps.MultiHeadAttention(d_in=768, d_out=768, context_length=1024, dropout=0.1, num_heads=12).eval()
x = torch.randn(1, 32, 768)
with torch.no_grad():
    heads = gpt2_mha.attention_weights(x)[0]  # (12, 32, 32)
print(sum(p.numel() for p in gpt2_mha.parameters()), "parameters (4 x 768 x 768 weights + biases)")

# %% tags=["plot"]
fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
for h, ax in enumerate(axes):
    ax.imshow(heads[h], cmap="viridis")
    ax.set_title(f"head {h}")
    ax.set_xlabel("key position")
axes[0].set_ylabel("query position")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 5. The production version
#
# `gptlab.model.CausalSelfAttention` is this `MultiHeadAttention` made fast: one fused matmul computes
# queries, keys and values together (`c_attn`, whose weight is the three weights stacked), and
# PyTorch's `scaled_dot_product_attention` does scores, mask, softmax and dropout in one fused kernel.
# `as_causal_self_attention` copies the weights over; the outputs agree to float rounding.

# %%
import time

from gptlab.model import CausalSelfAttention

production = steps.as_causal_self_attention(gpt2_mha).eval()
assert isinstance(production, CausalSelfAttention)
print("c_attn:", tuple(production.c_attn.weight.shape), "= W_query, W_key, W_value stacked")
with torch.no_grad():
    difference = (production(x) - gpt2_mha(x)).abs().max().item()
print(f"largest difference: {difference:.1e}")
assert difference < 1e-5

# %% [markdown]
# And it is faster, the more so the longer the sequence: the book's version writes the whole (T, T)
# score matrix of every head to memory several times (scores, mask, softmax, dropout), the fused kernel
# never holds it. Timed on GPT-2's full context of 1,024 tokens (two tries each, so expect noise on a
# busy machine):

# %%
long = torch.randn(1, 1024, 768)
with torch.no_grad():
    for name, module in [("MultiHeadAttention (book)", gpt2_mha), ("CausalSelfAttention (gptlab)", production)]:
        module(long)  # warm up
        start = time.perf_counter()
        for _ in range(2):
            module(long)
        print(f"{name:30s} {(time.perf_counter() - start) / 2 * 1000:7.1f} ms")

# %% [markdown]
# Next: [03_gpt_model.py](03_gpt_model.py) stacks this attention into a GPT.
