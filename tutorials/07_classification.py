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
# # 7. Classification fine-tuning: a spam filter
#
# The LLMs-from-scratch book's chapter 6 turns GPT-2 into a classifier: replace the output head (one
# score per vocabulary token) with a head of one score per class, and train on labelled texts. The
# class is read at the **last** token, the only position that has seen the whole message through
# causal attention.
#
# gptlab's `finetune_classifier` does this for any labelled file. Here: the SMS Spam Collection shipped
# in `data/`, balanced to 747 ham + 747 spam as in the book, and the `tiny` preset from random weights
# (the book starts from GPT-2's weights: `init="gpt2"`, notebook 6). Two epochs take seconds.

# %%
# %matplotlib inline
import logging
import os
from pathlib import Path

import matplotlib.pyplot as plt

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "data" / "the-verdict.txt").is_file())
OUT = Path(os.environ.get("GPTLAB_TUTORIAL_OUT", ROOT / "runs" / "tutorials"))
logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)

data = ROOT / "data" / "SMSSpamCollection"
print(data.read_text(encoding="utf-8").splitlines()[:3])

# %% [markdown]
# ## The new head
#
# `add_classifier_head` is the surgery: `lm_head` becomes `Linear(n_embd, num_classes)`. The rest of the
# model is unchanged, so a pretrained body keeps what it knows.

# %%
import torch

from gptlab.model import GPTConfig, GPTModel
from gptlab.surgery import add_classifier_head

model = GPTModel(GPTConfig.preset("tiny"))
print("before:", model.lm_head)
add_classifier_head(model, num_classes=2)
print("after: ", model.lm_head)
with torch.no_grad():
    print("logits for one 5-token text:", tuple(model(torch.randint(0, 50257, (1, 5))).shape), "-> read position -1")

# %% [markdown]
# ## Train
#
# A seeded, stratified 70/10/20 split; evaluation (loss and accuracy) after each epoch; the test set
# and the 4,080 ham messages that balancing left out are classified at the end.

# %%
from dataclasses import replace

from gptlab.config import classifier_training
from gptlab.finetune.classifier import finetune_classifier

run_dir = OUT / "spam"
recipe = replace(classifier_training(None), epochs=2.0)  # the command line's recipe from random weights, 2 epochs
print(recipe)
result = finetune_classifier(data, run_dir, recipe, balance=True, overwrite=True, progress=False)

# %%
print(result.reports["test"].format())
print(f"\nleft out by balancing: {result.left_out['n']} ham messages, "
      f"false-positive rate {result.left_out['false_positive_rate']:.2%}")

# %% [markdown]
# ## The confusion matrix
#
# Rows are the true class, columns the prediction: the diagonal is right, the off-diagonal cells are
# the two kinds of mistake (ham flagged as spam is the one a user notices).

# %% tags=["plot"]
report = result.reports["test"]
fig, ax = plt.subplots(figsize=(4, 3.5))
image = ax.imshow(report.confusion, cmap="Blues")
fig.colorbar(image, ax=ax)
ax.set_xticks(range(2), report.labels)
ax.set_yticks(range(2), report.labels)
ax.set_xlabel("predicted")
ax.set_ylabel("true")
for t in range(2):
    for p in range(2):
        ax.text(p, t, report.confusion[t][p], ha="center", va="center",
                color="white" if report.confusion[t][p] > report.total / 4 else "black")
ax.set_title(f"test set, accuracy {report.accuracy:.1%}")
plt.show()

# %% [markdown]
# The run directory holds gptlab's own plots, drawn by the stage:

# %% tags=["plot"]
from IPython.display import Image, display

print(sorted(p.name for p in run_dir.iterdir()))
for name in ("confusion_matrix.png", "accuracy.png"):
    display(Image(filename=run_dir / name))

# %% [markdown]
# ## Use the classifier
#
# `Classifier.load` reads the run; `predict` returns each text's label and class probabilities (the
# command line: `gptlab classify --model RUN "text"`).

# %%
from gptlab.classify import Classifier

clf = Classifier.load(run_dir)
texts = ["WINNER!! Claim your free prize now, call 09061701461", "See you at lunch?",
         "URGENT: your account is suspended, reply YES to 80082"]
for text, prediction in zip(texts, clf.predict(texts)):
    print(f"{prediction.label:5s} {prediction.probability:.3f}  {text}")

# %% [markdown]
# Next: [08_instruction_tuning.py](08_instruction_tuning.py) fine-tunes a model to follow instructions.
