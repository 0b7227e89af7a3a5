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
# # 1. Tokenization: from text to token ids
#
# A language model reads numbers, not text. This notebook walks the path of the LLMs-from-scratch book's
# chapter 2 with gptlab's code:
#
# 1. split text into words and give each word an id (`SimpleTokenizerV1`),
# 2. handle unknown words and document breaks (`SimpleTokenizerV2`),
# 3. GPT-2's byte-level BPE, which never meets an unknown word,
# 4. BPE written from scratch (`gptlab.bpe`), and training your own vocabulary,
# 5. cutting the token stream into (input, target) training windows.
#
# Everything runs offline on the text shipped in `data/`.

# %%
# %matplotlib inline
from pathlib import Path

import matplotlib.pyplot as plt

# the repository root, whether this runs from tutorials/ (Jupyter) or from the root (python tutorials/...)
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "data" / "the-verdict.txt").is_file())
text = (ROOT / "data" / "the-verdict.txt").read_text(encoding="utf-8")
print(f"{len(text):,} characters")
print(text[:99])

# %% [markdown]
# ## Words and punctuation as tokens
#
# The book splits on whitespace and punctuation with one regular expression, keeping the punctuation as
# tokens of its own. `SimpleTokenizerV1.split_words` is that split; `from_text` numbers every distinct
# token in alphabetical order.

# %%
from gptlab.tokenizer import SimpleTokenizerV1, SimpleTokenizerV2

words = SimpleTokenizerV1.split_words(text)
print(len(words), "tokens, for example", words[:12])

tok_v1 = SimpleTokenizerV1.from_text(text)
print("vocabulary size:", tok_v1.n_vocab)
ids = tok_v1.encode('"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.')
print(ids)
print(tok_v1.decode(ids))

# %% [markdown]
# A word-level vocabulary only knows the words it was built from. A new word is an error in V1:

# %%
from gptlab.errors import GptlabError

try:
    tok_v1.encode("Hello, do you like tea?")
except GptlabError as e:
    print("GptlabError:", e)

# %% [markdown]
# V2 adds two special tokens: `<|unk|>` stands for any unknown word, and `<|endoftext|>` separates
# unrelated documents joined into one training text.

# %%
tok_v2 = SimpleTokenizerV2.from_text(text)
joined = " <|endoftext|> ".join(["Hello, do you like tea?", "In the sunlit terraces of the palace."])
ids = tok_v2.encode(joined, allowed_special={"<|endoftext|>"})
print(ids)
print(tok_v2.decode(ids))

# %% [markdown]
# ## GPT-2's byte-level BPE
#
# Byte-pair encoding starts from the 256 byte values and repeatedly merges the most frequent adjacent
# pair into a new token. Frequent words become one token; a rare word is spelled with several pieces,
# down to single bytes if needed, so there are no unknown words at all. GPT-2's vocabulary has 50,257
# tokens (50,000 merges + 256 bytes + `<|endoftext|>`); gptlab ships it, so this works offline.

# %%
from gptlab.tokenizer import get_tokenizer

gpt2 = get_tokenizer("gpt2")
sample = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
ids = gpt2.encode(sample, allowed_special={"<|endoftext|>"})
print(gpt2.n_vocab, "tokens in the vocabulary;", len(ids), "ids:", ids)
print([gpt2.decode([i]) for i in ids])  # each id's piece of text
assert gpt2.decode(ids) == sample  # lossless

# %% [markdown]
# ## BPE from scratch
#
# `gptlab.bpe.BPETokenizer` is the same algorithm in readable Python: GPT-2's regex first cuts the text
# into pre-tokens (a word with its leading space, a run of digits, punctuation), then each pre-token's
# bytes are merged pair by pair, lowest rank (earliest learned merge) first. `encode` hands the work to
# tiktoken's Rust core; `encode_python` is the reference loop. Loaded with GPT-2's ranks, both give
# GPT-2's ids.

# %%
from gptlab.bpe import ENDOFTEXT, BPETokenizer
from gptlab.tokenizer import GPT2_EOT_ID, GPT2_VOCAB_FILE

scratch = BPETokenizer.from_tiktoken_file(GPT2_VOCAB_FILE, {ENDOFTEXT: GPT2_EOT_ID})
ids_python = scratch.encode_python(sample, allowed_special={ENDOFTEXT})
print(ids_python == ids, "- the from-scratch encoder gives GPT-2's ids")
print("the whole story:", scratch.encode_python(text) == gpt2.encode(text))

# %% [markdown]
# ## Train your own vocabulary
#
# `train_bpe` learns merges from a text: count the pre-tokens, then repeatedly merge the most frequent
# pair. The first merges it learns on *The Verdict* are the commonest pieces of English:

# %%
from gptlab.bpe import train_bpe

verdict_bpe = train_bpe(text, vocab_size=300)
print([(a + b).decode("utf-8", "replace") for a, b in verdict_bpe.merges[:20]])

# %% [markdown]
# A bigger vocabulary means fewer tokens per text (a shorter sequence for the model to read) but more
# embeddings to learn. Training is greedy and deterministic, so the first merges do not depend on how
# many follow: the vocabulary of size *n* is the first *n* tokens of a larger one. Train 4,000 tokens on
# tinyshakespeare (1.1 MB) once, and cut it to smaller sizes:

# %%
shakespeare = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
big = train_bpe(shakespeare, vocab_size=4000)


def first_tokens(tok: BPETokenizer, n: int) -> BPETokenizer:
    """The vocabulary of size n: the first n - 1 merged tokens and bytes, then <|endoftext|>."""
    return BPETokenizer({t: r for t, r in tok.ranks.items() if r < n - 1}, {ENDOFTEXT: n - 1})


print(first_tokens(big, 300).ranks == train_bpe(shakespeare, vocab_size=300).ranks)

# %% [markdown]
# Measure the tokens per character on *The Verdict*, a text these vocabularies were not trained on:

# %%
sizes = [257, 300, 500, 1000, 2000, 4000]
ratios = [len(first_tokens(big, n).encode(text)) / len(text) for n in sizes]
for n, r in zip(sizes, ratios):
    print(f"vocab {n:>5}: {r:.3f} tokens per character")
gpt2_ratio = len(gpt2.encode(text)) / len(text)

# %% tags=["plot"]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(sizes, ratios, marker="o", label="BPE trained on tinyshakespeare")
ax.axhline(gpt2_ratio, color="gray", linestyle="--", label=f"GPT-2 (50,257 tokens): {gpt2_ratio:.3f}")
ax.set_xscale("log")
ax.set_xlabel("vocabulary size")
ax.set_ylabel("tokens per character of The Verdict")
ax.set_title("Bigger vocabularies, shorter sequences")
ax.legend()
plt.show()

# %% [markdown]
# A trained tokenizer saves to a directory and loads back with `get_tokenizer`, the way a run
# directory keeps the tokenizer it was trained with (`gptlab train-tokenizer` on the command line).

# %%
import tempfile

with tempfile.TemporaryDirectory() as tmp:
    tok = first_tokens(big, 1000)
    tok.save(tmp)
    print(sorted(p.name for p in Path(tmp).iterdir()))
    again = get_tokenizer(tmp)
    print(again.encode("To be, or not to be") == tok.encode("To be, or not to be"))

# %% [markdown]
# ## From a token stream to training examples
#
# A language model learns to predict the next token. Cut the ids into windows of `max_length` tokens;
# the target of each window is the same window shifted by one. `TokenWindowDataset` does this
# (`stride` is the step between windows; equal to `max_length`, they do not overlap).

# %%
import numpy as np

from gptlab.data import TokenWindowDataset

tokens = np.array(gpt2.encode(text))
windows = TokenWindowDataset(tokens, max_length=4, stride=4)
x, y = windows[0]
print(len(windows), "windows of 4 tokens")
print("input: ", x.tolist(), repr(gpt2.decode(x.tolist())))
print("target:", y.tolist(), repr(gpt2.decode(y.tolist())))
for i in range(1, 5):
    print(repr(gpt2.decode(x[:i].tolist())), "->", repr(gpt2.decode([y[i - 1].item()])))

# %% [markdown]
# Next: [02_attention.py](02_attention.py) turns these ids into vectors and lets them look at each other.
