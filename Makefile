# `make demo` and `make test` set up what they need (a virtualenv in .venv with pinned torch and the
# package with its extras) and skip what is already there.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-install when the project's dependencies change.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup demo test clean browser-deps classifier bench book-ch5
setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU build first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Reference implementation for the tests; the package declares heavy deps it does not need.
	$(PY) -m pip install -q --no-deps llms-from-scratch
	rm -f $(VENV)/.installed-*
	touch $@

# Pretrain the `demo` preset on the-verdict.txt until it has memorised it (train loss < 1), then sample; in float32, as
# README "What `make demo` does" measured it (--precision auto would pick bf16 on a CPU with native bf16).
demo: setup
	$(VENV)/bin/gptlab pretrain --data data/the-verdict.txt --preset demo --out runs/demo --overwrite --precision fp32 \
		--batch-size 2 --lr 1e-3 --warmup-steps 10 --max-steps 500 --eval-interval 250
	$(VENV)/bin/gptlab generate --model runs/demo --prompt "Every effort moves you" --max-new-tokens 50

# The README's measured spam classifier: from random weights, balanced SMS Spam Collection, a few minutes on CPU.
classifier: setup
	$(VENV)/bin/gptlab finetune-classifier --data data/SMSSpamCollection --balance --out runs/spam --overwrite
	$(VENV)/bin/gptlab classify --model runs/spam "WINNER!! Claim your free prize now, call 09061701461" "See you at lunch?"

# The LLMs-from-scratch book's chapter-5 run (its GPT_CONFIG_124M, initialisation and AdamW): README "Reproduce the book's chapter 5".
# In float32, as the book trains.
book-ch5: setup
	$(VENV)/bin/gptlab pretrain --data data/the-verdict.txt --preset book-124m --out runs/book-ch5 --overwrite --seed 123 --precision fp32 \
		--epochs 10 --batch-size 2 --lr 4e-4 --weight-decay 0.1 --adam-betas 0.9 0.999 \
		--warmup-steps 0 --min-lr-ratio 1 --grad-clip 0 --eval-interval 5 --eval-train-batches 5

# The chat page's browser test drives Debian's chromium + chromium-driver (nothing downloads a browser):
# installed here when missing, if we can (root with apt-get); otherwise that one test says it is skipped.
browser-deps:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "note: chromium/chromedriver missing and apt-get unavailable (or not root): the browser test will skip"; fi

# Speed against Hugging Face transformers and llms-from-scratch (see BENCHMARKS.md); BENCH_ARGS=--quick for minutes.
bench: setup
	$(PY) -m pip install -q -r benchmarks/requirements.txt --no-deps
	$(PY) benchmarks/bench_speed.py $(BENCH_ARGS)

# The tutorial notebooks in JupyterLab. Each tutorials/NN_*.py (jupytext percent format, the tracked file)
# is paired with a tutorials/NN_*.ipynb made here (untracked: it keeps the outputs); saving in Jupyter writes both.
.PHONY: tutorials
tutorials: setup
	$(PY) -m pip install -q -e '.[tutorials]'
	$(VENV)/bin/jupytext --sync tutorials/[0-9][0-9]_*.py
	$(VENV)/bin/jupyter lab --notebook-dir=tutorials

test: setup browser-deps
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
