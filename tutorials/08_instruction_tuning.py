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
# # 8. Instruction tuning, and judging the answers
#
# The LLMs-from-scratch book's chapter 7: fine-tune a model on (instruction, input, output) records laid
# out in a prompt template, let it answer held-out instructions, and score the answers, by overlap with
# the reference (ROUGE-L) and by asking another model to judge them.
#
# The book fine-tunes GPT-2 medium (355M) for minutes on a GPU. To run offline in seconds, this notebook
# fine-tunes the `tiny` preset from random weights: it learns the *form* of an answer, not knowledge
# (README: "What to expect"). The judge is a real OpenAI-compatible server, gptlab's own `gptlab serve`,
# started here in the background and stopped at the end; with Ollama running, `JudgeClient()` asks
# Llama 3 instead, as the book does.

# %%
# %matplotlib inline
import json
import logging
import os
from pathlib import Path

import matplotlib.pyplot as plt

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "data" / "the-verdict.txt").is_file())
OUT = Path(os.environ.get("GPTLAB_TUTORIAL_OUT", ROOT / "runs" / "tutorials"))
logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)

# %% [markdown]
# ## The records and the prompt template
#
# 1,100 records ship with gptlab (the book's `instruction-data.json`). The Alpaca template turns each
# into one text: a preamble, the instruction, the optional input, and the response after its header.

# %%
from gptlab.instruction_data import default_data_path, load_instruction_records
from gptlab.prompts import get_prompt_style

records = load_instruction_records(default_data_path())
alpaca = get_prompt_style("alpaca")
print(len(records), "records; one of them in the template:\n")
print(alpaca.example(records[1]["instruction"], records[1]["input"], records[1]["output"]))

# %% [markdown]
# ## Fine-tune
#
# As in notebook 4, a small vocabulary trained on the records themselves keeps a tiny model's steps
# cheap on a CPU (GPT-2's 50,257-token head would cost most of the compute). `finetune_instruct`
# splits the records as the book does (85% train, 10% test, 5% validation), pads each batch with
# `<|endoftext|>`, and trains on the whole text; records whose prompt alone fills the 64-token context
# are left out, with a warning.

# %%
from gptlab.bpe import train_bpe
from gptlab.config import TrainConfig
from gptlab.finetune.instruct import finetune_instruct

examples = [alpaca.example(r["instruction"], r["input"], r["output"]) for r in records]
train_bpe("\n\n".join(examples), vocab_size=4096).save(OUT / "instruct-bpe")

run_dir = OUT / "instruct"
result = finetune_instruct(
    None, run_dir,  # None: the shipped records
    TrainConfig(max_steps=200, batch_size=8, lr=1e-2, warmup_steps=5, eval_interval=50, log_interval=10),
    preset="tiny", tokenizer=str(OUT / "instruct-bpe"), overwrite=True, progress=False,
)

# %% tags=["plot"]
train_rows = [(int(r["step"]), float(r["train_loss"])) for r in result.history if r.get("train_loss")]
val_rows = [(int(r["step"]), float(r["val_loss"])) for r in result.history if r.get("val_loss")]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(*zip(*train_rows), marker="o", markersize=3, label="training")
ax.plot(*zip(*val_rows), marker="s", markersize=3, label="validation")
ax.set_xlabel("step")
ax.set_ylabel("loss")
ax.set_title("Instruction fine-tuning (tiny preset, from random weights)")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## Answer the held-out instructions
#
# The run directory holds the 110 test records (`test.json`) and the prompt style; `respond` writes each
# record's answer under `model_response`, as `gptlab respond` does.

# %%
import gptlab
from gptlab.files import atomic_write_text
from gptlab.respond import model_prompt_style, respond

model, tok = gptlab.load(run_dir)
style = model_prompt_style(run_dir)
test_records = json.loads((run_dir / "test.json").read_text(encoding="utf-8"))[:8]
answered = respond(model, tok, style, test_records, max_new_tokens=40, progress=False)
responses = run_dir / "responses.json"
atomic_write_text(responses, json.dumps(answered, indent=2))
for r in answered[:4]:
    print(f"instruction: {r['instruction']} {r['input']}\nreference:   {r['output']}\nmodel:       {r['model_response']}\n")

# %% [markdown]
# ## Score by overlap: ROUGE-L
#
# ROUGE-L is the F-measure of the longest common subsequence of words between answer and reference:
# 1 for the same words in the same order, 0 for nothing in common. It needs no judge, and it rewards
# shared phrasing, not correctness.

# %%
from gptlab.evaluate import offline_scores

summary = offline_scores(answered)
print(f"mean ROUGE-L {summary['rouge_l']:.3f}, exact match {summary['exact_match']:.0%} over {summary['n']} records")

# %% tags=["plot"]
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(range(len(answered)), [r["rouge_l"] for r in answered])
ax.set_xlabel("test record")
ax.set_ylabel("ROUGE-L")
ax.set_ylim(0, 1)
ax.set_title("Overlap of each answer with its reference")
plt.show()

# %% [markdown]
# ## Judge with a model behind an OpenAI-compatible server
#
# `gptlab judge` sends the book's prompt ("score the model response ... from 0 to 100 ... integer
# number only") to any `/v1/chat/completions` endpoint. Start `gptlab serve` in the background with the
# model we just trained, on a free port of 127.0.0.1. (`ExitStack` keeps it running across cells; the
# last cell stops it.)

# %%
from contextlib import ExitStack

from gptlab.config import ServeLimits
from gptlab.serve import BackgroundServer, ServedModel, create_app

served = ServedModel.load(run_dir, name="tutorial-judge")
app = create_app(served, limits=ServeLimits(default_max_tokens=16))  # a judge answers with a number: short
servers = ExitStack()
server = servers.enter_context(BackgroundServer(app))
print("serving", served.name, "at", server.url)

# %% [markdown]
# The server speaks OpenAI's API, so any client works; here the standard library:

# %%
import urllib.request

body = {"model": served.name, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12,
        "temperature": 0}
request = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=30) as reply:
    completion = json.loads(reply.read())
print(json.dumps(completion["choices"][0], indent=2))
print("usage:", completion["usage"])

# %% [markdown]
# Now judge the answers. A model this small is no judge: its 64-token context sees only the end of the
# judge's prompt (the server crops it from the left, with a warning), it mostly answers in words, and
# `parse_score` then leaves the record unscored (and uncached, so a rerun with a real judge asks
# again); a number it does produce is no verdict either. That is the honest result here; the mechanics (the prompt, the endpoint, parsing, the cache
# beside the output) are the same for a real judge: `JudgeClient()` talks to Ollama's Llama 3 at
# `http://localhost:11434/v1`, and `JudgeClient(base_url="https://api.openai.com/v1", model="gpt-4o-mini",
# api_key=...)` to OpenAI.

# %%
from gptlab.evaluate import JudgeClient, evaluate_responses, judge_prompt

print("the judge's prompt for the first record:\n", judge_prompt(answered[0]), "\n")
client = JudgeClient(base_url=server.url + "/v1", model=served.name, timeout=60)
judged = evaluate_responses(responses, client=client, progress=False)
print({k: judged[k] for k in ("n", "rouge_l", "judged", "unscored", "judge_mean")})
print(judged["text_histogram"])
if "plot" in judged:  # the histogram as a PNG beside the output, when there were scores
    from IPython.display import Image, display

    display(Image(filename=judged["plot"]))

# %%
servers.close()  # stops the server
try:
    urllib.request.urlopen(server.url + "/health", timeout=2)
    print("still running?")
except OSError:
    print("the server has stopped")

# %% [markdown]
# On the command line the same path is `gptlab finetune-instruct`, `gptlab respond`, `gptlab serve` and
# `gptlab judge --input RUN/responses.json` (`--offline` for ROUGE-L only).
#
# Later issues add notebooks for LoRA, preference tuning (DPO) and quantization.
