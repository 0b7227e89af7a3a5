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
# # 4. Pretraining on *The Verdict*
#
# Pretraining teaches a model to predict the next token of real text. This notebook follows the
# LLMs-from-scratch book's chapter 5: the loss a model is trained on (cross-entropy, perplexity), then a
# short training run on Edith Wharton's *The Verdict* with gptlab's `pretrain`, its loss curve, and
# text from the trained model.
#
# The run here is small so that it finishes in seconds (the `tiny` preset with a small vocabulary);
# `make demo` trains the 13M-parameter `demo` preset until it has memorised the story.

# %%
# %matplotlib inline
import logging
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "data" / "the-verdict.txt").is_file())
OUT = Path(os.environ.get("GPTLAB_TUTORIAL_OUT", ROOT / "runs" / "tutorials"))  # where the runs go
logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # gptlab's progress lines

# %% [markdown]
# ## The loss: how surprised the model is by the true next token
#
# For every position the model outputs a score (logit) per vocabulary token; a softmax makes them
# probabilities. The loss is the mean of −log p(true next token): 0 for a model that is sure and right,
# and about ln(50,257) ≈ 10.8 for an untrained model that spreads its bets evenly. Perplexity, e^loss, reads as
# "as unsure as a uniform choice among that many tokens".

# %%
import torch.nn.functional as F

from gptlab.model import GPTConfig, GPTModel
from gptlab.tokenizer import get_tokenizer

tok = get_tokenizer("gpt2")
torch.manual_seed(123)
model = GPTModel(GPTConfig.preset("tiny")).eval()

text_ids = torch.tensor([tok.encode("every effort moves you forward")])
inputs, targets = text_ids[:, :-1], text_ids[:, 1:]  # the target is the next token
with torch.no_grad():
    logits = model(inputs)  # (1, T, V)
    probs = logits.softmax(dim=-1)
    p_target = probs[0, torch.arange(targets.shape[1]), targets[0]]
    by_hand = -p_target.log().mean()
    loss = model(inputs, targets=targets)  # what training minimises
print("p(true next token):", p_target.numpy().round(6))
print(f"loss by hand {by_hand:.4f}, F.cross_entropy {F.cross_entropy(logits[0], targets[0]):.4f}, model(...) {loss:.4f}")
print(f"perplexity {loss.exp():,.0f} (vocabulary: {tok.n_vocab:,})")

# %% [markdown]
# ## Train
#
# `pretrain` reads the text, holds out its last 10% for validation, cuts both into windows of the
# context length and trains with AdamW, warmup and cosine decay, evaluating every `eval_interval`
# steps. It writes a run directory: weights, `metrics.csv`, `loss.png`, a resumable checkpoint. The
# Python call and `gptlab pretrain` take the same settings.
#
# One change from the book, for speed: a small model spends most of its compute in the output head,
# one column per vocabulary token (50,257 for GPT-2). A BPE vocabulary of 1,024 tokens trained on the
# story itself (notebook 1) makes each step dozens of times cheaper on a CPU, so a few seconds of
# training already produce words. (Losses over different vocabularies are not comparable: fewer
# tokens to choose from means a lower loss from the start.)

# %%
from gptlab.bpe import train_bpe
from gptlab.config import TrainConfig
from gptlab.pretrain import pretrain

verdict = ROOT / "data" / "the-verdict.txt"
train_bpe(verdict.read_text(encoding="utf-8"), vocab_size=1024).save(OUT / "verdict-bpe")

run_dir = OUT / "pretrain"
result = pretrain(
    verdict, run_dir,
    TrainConfig(max_steps=240, batch_size=8, lr=1e-2, warmup_steps=5, eval_interval=40, log_interval=8),
    preset="tiny", tokenizer=str(OUT / "verdict-bpe"), overwrite=True, progress=False,
)
print(f"step {result.step}: train loss {result.train_loss:.2f}, validation loss {result.val_loss:.2f}")

# %% [markdown]
# `result.history` holds the rows of `metrics.csv`: the training loss every `log_interval` steps and
# the validation loss at each evaluation.

# %% tags=["plot"]
train_rows = [(int(r["tokens_seen"]), float(r["train_loss"])) for r in result.history if r.get("train_loss")]
val_rows = [(int(r["tokens_seen"]), float(r["val_loss"])) for r in result.history if r.get("val_loss")]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(*zip(*train_rows), marker="o", markersize=3, label="training")
ax.plot(*zip(*val_rows), marker="s", markersize=3, label="validation")
ax.set_xlabel("tokens seen")
ax.set_ylabel("cross-entropy loss")
ax.set_title("Pretraining the tiny preset on The Verdict (1,024-token BPE)")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# The same curve as gptlab draws it into the run directory:

# %% tags=["plot"]
from IPython.display import Image, display

print(sorted(p.name for p in run_dir.iterdir()))
display(Image(filename=run_dir / "loss.png"))

# %% [markdown]
# ## Text from the trained model
#
# `gptlab.load` reads any run directory back, with its tokenizer. The untrained model strings random
# tokens together; after a few seconds of training the model writes the story's words, names and
# punctuation, not yet sentences. (Sampled with a temperature: greedy decoding of a weak model repeats
# its single likeliest token, notebook 5 shows why.)

# %%
import gptlab
from gptlab.generate import generate_text

trained, trained_tok = gptlab.load(run_dir)
prompt = "Every effort moves you"
print("untrained:", repr(generate_text(model, tok, prompt, max_new_tokens=20, temperature=0.8, top_k=20, seed=1)))
for seed in (1, 2, 3):
    print("trained:  ", repr(generate_text(trained, trained_tok, prompt, max_new_tokens=30, temperature=0.8,
                                           top_k=20, seed=seed)))

# %% [markdown]
# The validation loss stops falling early and then rises while the training loss goes on down: on a
# text of a few thousand tokens the model memorises instead of generalising (`make demo`: training
# loss 0.96, validation 7.2). More data, not more steps, is the cure.
#
# Next: [05_decoding.py](05_decoding.py) looks at how the next token is chosen.
