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
# # 6. Weights: loading OpenAI's GPT-2, and where weights live
#
# Pretraining GPT-2 cost OpenAI far more compute than a laptop has; its weights are public. The
# LLMs-from-scratch book's section 5.5 loads them into its own model. gptlab's `gptlab.load(source)`
# reads them from the Hugging Face hub (`gpt2` ... `gpt2-xl`), from a Hugging Face folder, from OpenAI's
# TensorFlow checkpoint, from a book `.pth`, or from a gptlab run directory, always into the same
# `GPTModel`.
#
# The download needs internet once (500 MB for `gpt2`). This notebook uses the hub when it can be
# reached and the model is not cached yet; offline it says what to do, and the rest of the notebook
# (what a checkpoint holds, exporting and reloading) runs either way.

# %%
# %matplotlib inline
import os
import shutil
import socket
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import gptlab
from gptlab.errors import GptlabError

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "data" / "the-verdict.txt").is_file())
OUT = Path(os.environ.get("GPTLAB_TUTORIAL_OUT", ROOT / "runs" / "tutorials"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can this machine open a connection to the Hugging Face hub (and is it allowed to)?"""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


online = hub_reachable()
if not online:
    # the cache only: a model downloaded before still loads, and a missing one fails at once, not after timeouts
    os.environ["HF_HUB_OFFLINE"] = "1"
print("Hugging Face hub reachable:", online)

# %% [markdown]
# ## Load GPT-2 (124M)

# %%
try:
    gpt2, tok = gptlab.load("gpt2")
except GptlabError as e:
    gpt2 = None
    print("Could not load gpt2:", e)
    print("""
What to do:
  - connect to the internet once and run this cell again: the files go to the Hugging Face cache
    (~/.cache/huggingface, or $HF_HOME) and load from there afterwards, offline too;
  - or copy a Hugging Face cache that holds openai-community/gpt2 to this machine and set HF_HOME to it;
  - or load a local copy: gptlab.load("path/to/folder") reads a folder with config.json + model.safetensors
    (from save_pretrained), OpenAI's TensorFlow checkpoint folder (hparams.json + model.ckpt.*, needs
    pip install 'gptlab[tf]'), or a book model.pth.""")
else:
    print(f"loaded: {gpt2.num_parameters():,} parameters, {gpt2.config}")

# %% [markdown]
# With the weights, GPT-2 continues the book's prompt with real English, and its next-token
# probabilities are sharp where a small model's are flat (this cell prints a note when offline):

# %%
if gpt2 is not None:
    from gptlab.generate import generate_text

    prompt = "Every effort moves you"
    print(repr(generate_text(gpt2, tok, prompt, max_new_tokens=25)))
    with torch.no_grad():
        probs = gpt2(torch.tensor([tok.encode(prompt)]))[0, -1].softmax(-1)
    top = torch.topk(probs, 10)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar([repr(tok.decode([i])) for i in top.indices.tolist()], top.values)
    ax.set_title(f"GPT-2's next token after {prompt!r}")
    ax.tick_params(axis="x", rotation=60)
    plt.show()
else:
    print("offline: GPT-2 is not loaded, so there is no text to show; see the cell above for what to do")

# %% [markdown]
# ## What a checkpoint holds
#
# A checkpoint is a dictionary of named tensors. gptlab's names are OpenAI's, so each format is a short
# key map. One real difference: OpenAI (and so Hugging Face) store each projection as a `Conv1D` whose
# weight is (in, out); `nn.Linear` keeps (out, in), so those four matrices per block are transposed as
# they load. `c_attn` is queries, keys and values in one matrix (notebook 2).

# %%
from gptlab.model import GPTConfig, GPTModel

with torch.device("meta"):  # shapes only, no memory (notebook 3)
    skeleton = GPTModel(GPTConfig.preset("gpt2-small"))
for name, tensor in list(skeleton.state_dict().items())[:14]:
    print(f"{name:28s} {tuple(tensor.shape)}")
print("...", len(skeleton.state_dict()), "tensors; lm_head.weight is wte.weight (tied)")

# %% [markdown]
# How much memory the weights of each size take, in float32 (4 bytes a parameter) and bfloat16 (2):

# %% tags=["plot"]
sizes = ["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"]
counts = []
for size in sizes:
    with torch.device("meta"):
        counts.append(GPTModel(GPTConfig.preset(size)).num_parameters())
fig, ax = plt.subplots(figsize=(6, 3.5))
x = torch.arange(len(sizes))
ax.bar(x - 0.2, [c * 4 / 2**30 for c in counts], 0.4, label="float32")
ax.bar(x + 0.2, [c * 2 / 2**30 for c in counts], 0.4, label="bfloat16")
ax.set_xticks(x, [f"{s}\n{c / 1e6:,.0f}M" for s, c in zip(sizes, counts)])
ax.set_ylabel("GiB")
ax.set_title("Memory for the weights alone")
ax.legend()
plt.show()

# %% [markdown]
# ## Export, and load back
#
# `export_hf` writes a model in Hugging Face's layout (`config.json` + `model.safetensors`), which
# `transformers.GPT2LMHeadModel.from_pretrained` reads and so does `gptlab.load`. A round trip with a
# small random model gives back the same logits, to the bit:

# %%
from gptlab.tokenizer import get_tokenizer
from gptlab.weights import export_hf

torch.manual_seed(123)
small = GPTModel(GPTConfig.preset("tiny")).eval()
folder = OUT / "hf-tiny"
shutil.rmtree(folder, ignore_errors=True)
export_hf(small, folder, get_tokenizer("gpt2"))
print(sorted(p.name for p in folder.iterdir()))
print((folder / "config.json").read_text()[:300], "...")

again, again_tok = gptlab.load(folder)
ids = torch.tensor([again_tok.encode("Every effort moves you")])
with torch.no_grad():
    print("identical logits:", torch.equal(small(ids), again(ids)))

# %% [markdown]
# The config comes from the checkpoint, never from a guess; `expect=` turns a mismatch into an error
# that names the fields (only dropout may differ, as it holds no weights):

# %%
try:
    gptlab.load(folder, expect=GPTConfig.preset("mini"))
except GptlabError as e:
    print("GptlabError:", e)

# %% [markdown]
# On the command line: `gptlab generate --model gpt2 --prompt "..."`, `gptlab export --format hf RUN OUT`,
# and `--init gpt2` on the training commands to fine-tune OpenAI's weights (notebooks 7 and 8 start
# from random weights instead, so that they run offline in seconds).
#
# Next: [07_classification.py](07_classification.py).
