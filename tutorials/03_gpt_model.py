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
# # 3. The GPT model: shapes, parameters, and what `generate` does
#
# The book's chapter 4 assembles GPT-2 from parts: token and position embeddings, a stack of
# transformer blocks (layer norm, the causal multi-head attention of notebook 2, a feed-forward MLP,
# shortcut connections), a final norm and an output head. `gptlab.model.GPTModel` is that model; its
# module names are OpenAI's (`wte`, `h.0.attn.c_attn`, ...), so OpenAI's weights load by name.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import torch

from gptlab.model import GPTConfig, GPTModel

config = GPTConfig.preset("gpt2-small")
print(config)

# %% [markdown]
# ## Counting parameters without allocating them
#
# On PyTorch's `meta` device a tensor has a shape and no storage: the 124M-parameter model is built in a
# moment and takes no memory, which is all we need to count.

# %%
with torch.device("meta"):
    gpt2 = GPTModel(config)
print(gpt2)

# %%
def parameters_by_part(model: GPTModel) -> dict[str, int]:
    """Parameter counts of the embeddings, attention, MLPs and norms (a tied head is the embedding)."""
    parts = {"token embedding": 0, "position embedding": 0, "attention": 0, "MLP": 0, "layer norms": 0}
    for name, p in model.named_parameters():  # a tied lm_head is wte itself, listed once
        part = ("token embedding" if name.startswith(("wte", "lm_head")) else "position embedding" if name.startswith("wpe")
                else "attention" if ".attn." in name else "MLP" if ".mlp." in name else "layer norms")
        parts[part] += p.numel()
    return parts


parts = parameters_by_part(gpt2)
for part, n in parts.items():
    print(f"{part:20s} {n:>12,}")
print(f"{'total':20s} {gpt2.num_parameters():>12,}   ({gpt2.num_parameters() * 4 / 2**20:,.0f} MB in float32)")

# %% [markdown]
# 124,439,808: exactly Hugging Face's GPT-2. The book counts 163M because its output head is a separate
# matrix; GPT-2 *ties* it to the token embedding (`tie_weights`), which saves 38.6M parameters:

# %%
with torch.device("meta"):
    untied = GPTModel(GPTConfig.preset("gpt2-small", tie_weights=False))
print(f"{untied.num_parameters():,} with a separate head")

sizes = ["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"]
by_size = {}
for size in sizes:
    with torch.device("meta"):
        by_size[size] = parameters_by_part(GPTModel(GPTConfig.preset(size)))

# %% tags=["plot"]
fig, ax = plt.subplots(figsize=(7, 4))
bottom = [0.0] * len(sizes)
for part in parts:
    values = [by_size[s][part] / 1e6 for s in sizes]
    ax.bar(sizes, values, bottom=bottom, label=part)
    bottom = [b + v for b, v in zip(bottom, values)]
for i, total in enumerate(bottom):
    ax.text(i, total, f"{total:,.0f}M", ha="center", va="bottom")
ax.set_ylabel("parameters (millions)")
ax.set_title("Where GPT-2's parameters are")
ax.legend()
plt.show()

# %% [markdown]
# ## Shapes through the model
#
# A real (allocated) model, the `tiny` preset: 2 layers, 32 wide, 2 heads, context 64, GPT-2's
# vocabulary. Forward hooks print what each part hands to the next.

# %%
from gptlab.tokenizer import get_tokenizer

tok = get_tokenizer("gpt2")
torch.manual_seed(123)
model = GPTModel(GPTConfig.preset("tiny")).eval()
batch = torch.tensor([tok.encode("Every effort moves you"), tok.encode("Every day holds a")])
print("token ids:", tuple(batch.shape), "(batch B, tokens T)")

hooks = [module.register_forward_hook(lambda m, inputs, output, name=name: print(f"{name:12s} -> {tuple(output.shape)}"))
         for name, module in model.named_modules() if name in ("wte", "wpe", "h.0.ln_1", "h.0.attn", "h.0.mlp", "h.0", "h.1", "ln_f", "lm_head")]
with torch.no_grad():
    logits = model(batch)
for h in hooks:
    h.remove()
print("logits:", tuple(logits.shape), "= one score per vocabulary token, at every position")

# %% [markdown]
# ## Two small parts: layer norm and GELU
#
# Layer norm rescales each token's vector to mean 0 and variance 1 (then a learned scale and shift),
# which keeps activations in range through many layers. The MLP's nonlinearity is GELU, a smooth ReLU
# that lets small negative values through; GPT-2 used its tanh approximation.

# %%
h = model.h[0].ln_1(torch.randn(2, 4, 32) * 5 + 3)
print("after layer norm: mean", h.mean(-1)[0].detach().numpy().round(4), "var", h.var(-1, unbiased=False)[0].detach().numpy().round(3))

# %% tags=["plot"]
x = torch.linspace(-3, 3, 200)
fig, ax = plt.subplots(figsize=(5, 3.2))
ax.plot(x, torch.nn.functional.gelu(x, approximate="tanh"), label="GELU (tanh approximation)")
ax.plot(x, torch.relu(x), label="ReLU", linestyle="--")
ax.set_title("The MLP's activation")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## What `generate` does
#
# Generation is a loop: run the model on the tokens so far, take the logits of the **last** position,
# pick a token (greedy: the highest), append it, repeat. Here it is by hand, next to gptlab's
# `generate`, on the untrained model (so the text is random tokens):

# %%
from gptlab.generate import generate

ids = torch.tensor([tok.encode("Every effort moves you")])
by_hand = ids
with torch.no_grad():
    for _ in range(10):
        next_logits = model(by_hand)[:, -1, :]  # (B, V): the prediction after the last token
        next_id = next_logits.argmax(dim=-1, keepdim=True)  # greedy
        by_hand = torch.cat([by_hand, next_id], dim=1)

out = generate(model, ids, max_new_tokens=10)
print(out.tolist() == by_hand.tolist(), repr(tok.decode(out[0].tolist())))

# %% [markdown]
# The loop above recomputes every earlier position at each step. `generate` keeps a **KV cache**: the
# keys and values of the tokens it has already seen, so each step feeds only the newest token. The
# tokens are the same with the cache or without (`use_cache=False`); the time is not:

# %%
import time

for use_cache in (False, True):
    start = time.perf_counter()
    out_c = generate(model, ids, max_new_tokens=60, use_cache=use_cache)
    print(f"use_cache={use_cache!s:5}: {time.perf_counter() - start:.3f} s")
print("same tokens:", torch.equal(out_c, generate(model, ids, max_new_tokens=60, use_cache=False)))

# %% [markdown]
# Next: [04_pretraining.py](04_pretraining.py) trains such a model so that its next tokens make sense.
