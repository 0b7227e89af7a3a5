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
# # 5. Decoding: choosing the next token
#
# A model gives a score (logit) for every token of its vocabulary; *decoding* turns those scores into
# one chosen token. The LLMs-from-scratch book's section 5.3 does it on a toy vocabulary of nine words;
# this notebook does the same, then checks that gptlab's `sample_next` samples exactly those
# distributions, and finally decodes with a small trained model.

# %%
# %matplotlib inline
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "data" / "the-verdict.txt").is_file())
OUT = Path(os.environ.get("GPTLAB_TUTORIAL_OUT", ROOT / "runs" / "tutorials"))

vocab = ["closer", "every", "effort", "forward", "inches", "moves", "pizza", "toward", "you"]
# the book's logits for the token after "every effort moves you"
next_token_logits = torch.tensor([4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79])
probs = torch.softmax(next_token_logits, dim=0)
print({w: round(p, 4) for w, p in zip(vocab, probs.tolist())})
print("greedy:", vocab[int(next_token_logits.argmax())])

# %% [markdown]
# ## Sampling and temperature
#
# Greedy decoding always takes the likeliest token, so the same prompt always gives the same text, and
# a weak model loops. Sampling draws the token at random with the model's probabilities instead.
# **Temperature** divides the logits before the softmax: below 1 the distribution sharpens toward
# greedy, above 1 it flattens toward uniform. The book's figure, redrawn:

# %% tags=["plot"]
temperatures = [1, 0.1, 5]
scaled = [torch.softmax(next_token_logits / t, dim=0) for t in temperatures]
fig, ax = plt.subplots(figsize=(7, 3.5))
width = 0.15
for i, (t, p) in enumerate(zip(temperatures, scaled)):
    ax.bar(torch.arange(len(vocab)) + i * width, p, width, label=f"temperature {t}")
ax.set_xticks(torch.arange(len(vocab)) + width, vocab, rotation=90)
ax.set_ylabel("probability")
ax.set_title("Temperature scaling (the book's section 5.3.1)")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# How often each word comes out in 1,000 draws at each temperature (at 5, even "pizza" appears):

# %%
for t, p in zip(temperatures, scaled):
    torch.manual_seed(123)
    counts = torch.bincount(torch.multinomial(p, 1000, replacement=True), minlength=len(vocab))
    print(f"temperature {t}:", {w: int(c) for w, c in zip(vocab, counts) if c})

# %% [markdown]
# ## Top-k and top-p
#
# Two ways to cut off the long tail of unlikely tokens before sampling:
#
# - **top-k** keeps the *k* highest logits and sets the rest to −∞ (probability 0);
# - **top-p** (nucleus) keeps the smallest set of likeliest tokens whose probabilities add up to *p*, so
#   the number kept adapts: few when the model is sure, many when it is not.

# %%
top_k = 3
kth = torch.topk(next_token_logits, top_k).values[-1]
top_k_probs = torch.softmax(next_token_logits.masked_fill(next_token_logits < kth, float("-inf")), dim=0)

top_p = 0.9
sorted_probs, order = torch.sort(probs, descending=True)
keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # tokens ranked above it hold less than p: keep
top_p_probs = torch.zeros_like(probs)
top_p_probs[order[keep]] = sorted_probs[keep] / sorted_probs[keep].sum()
print("top-k 3 keeps:", [w for w, p in zip(vocab, top_k_probs) if p > 0])
print("top-p 0.9 keeps:", [w for w, p in zip(vocab, top_p_probs) if p > 0])

# %% [markdown]
# ## gptlab's sampler draws exactly these distributions
#
# `gptlab.generate.sample_next(logits, temperature, top_k, top_p, generator)` is the one function that
# `generate`, `gptlab generate` and the server use. Draw 20,000 tokens from it for each setting and
# compare the frequencies with the probabilities computed above:

# %%
from gptlab.generate import sample_next

settings = {
    "temperature 1": (dict(temperature=1.0), probs),
    "temperature 0.5": (dict(temperature=0.5), torch.softmax(next_token_logits / 0.5, dim=0)),
    "top-k 3": (dict(temperature=1.0, top_k=3), top_k_probs),
    "top-p 0.9": (dict(temperature=1.0, top_p=0.9), top_p_probs),
}
n = 20_000
frequencies = {}
for name, (kwargs, expected) in settings.items():
    generator = torch.Generator().manual_seed(0)
    draws = sample_next(next_token_logits.expand(n, -1), generator=generator, **kwargs)  # (n,) one per row
    frequencies[name] = torch.bincount(draws, minlength=len(vocab)) / n
    gap = (frequencies[name] - expected).abs().max().item()
    print(f"{name:16s} largest gap between frequency and probability: {gap:.4f}")
    assert gap < 0.02
print("temperature 0 is greedy:", vocab[int(sample_next(next_token_logits[None], temperature=0.0))])

# %% tags=["plot"]
fig, axes = plt.subplots(1, len(settings), figsize=(14, 3.2), sharey=True)
for ax, (name, (kwargs, expected)) in zip(axes, settings.items()):
    ax.bar(range(len(vocab)), expected, color="lightgray", label="probability")
    ax.plot(range(len(vocab)), frequencies[name], "o", color="C3", label="sampled frequency")
    ax.set_xticks(range(len(vocab)), vocab, rotation=90)
    ax.set_title(name)
axes[0].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## On a real model
#
# A small model pretrained for a few seconds on *The Verdict* (as in notebook 4), then the same prompt
# decoded four ways. Greedy repeats itself; sampling varies with the seed; a seed makes it repeatable.

# %%
import gptlab
from gptlab.bpe import train_bpe
from gptlab.config import TrainConfig
from gptlab.generate import generate_text
from gptlab.pretrain import pretrain

verdict = ROOT / "data" / "the-verdict.txt"
train_bpe(verdict.read_text(encoding="utf-8"), vocab_size=1024).save(OUT / "verdict-bpe")
pretrain(verdict, OUT / "decoding", TrainConfig(max_steps=120, batch_size=8, lr=1e-2, warmup_steps=5, eval_interval=120),
         preset="tiny", tokenizer=str(OUT / "verdict-bpe"), sample_prompt="", overwrite=True, progress=False)
model, tok = gptlab.load(OUT / "decoding")

prompt = "Every effort moves you"
for name, kwargs in [("greedy", {}), ("temperature 1.0", dict(temperature=1.0, seed=1)),
                     ("temperature 0.7, top-k 20", dict(temperature=0.7, top_k=20, seed=1)),
                     ("top-p 0.9", dict(temperature=1.0, top_p=0.9, seed=1))]:
    print(f"{name:26s} {generate_text(model, tok, prompt, max_new_tokens=25, **kwargs)!r}")
assert generate_text(model, tok, prompt, 25, temperature=1.0, seed=1) == generate_text(model, tok, prompt, 25, temperature=1.0, seed=1)

# %% [markdown]
# The same options on the command line: `gptlab generate --model RUN --prompt "..." --temperature 0.8
# --top-k 50 --top-p 0.95 --seed 1`.
#
# Next: [06_weights.py](06_weights.py) loads OpenAI's trained GPT-2 instead.
