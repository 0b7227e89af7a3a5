"""The ``gptlab`` command: argument parsing only; every subcommand calls the library in a few lines.

A ``GptlabError`` (a mistake the user can fix) prints one line and exits with status 2.
To add a subcommand: write ``add_<name>(subparsers)`` that registers it with ``set_defaults(run=...)``
and list it in ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import functools
import logging
import sys
from dataclasses import fields

from gptlab.errors import GptlabError
from gptlab.config import TrainConfig

log = logging.getLogger("gptlab")


# ---- options shared by several subcommands ------------------------------------------------------

def add_train_arguments(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The training loop's options, with a stage's own defaults shown in --help."""
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=defaults.epochs, help="passes over the training data (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=defaults.max_steps, help="optimizer steps; overrides --epochs")
    g.add_argument("--batch-size", type=int, default=defaults.batch_size, help="examples per micro-batch (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=defaults.grad_accum, help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default: %(default)s)")
    g.add_argument("--min-lr-ratio", type=float, default=defaults.min_lr_ratio, help="final lr as a fraction of --lr (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warmup steps (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW decay of weight matrices (default: %(default)s)")
    g.add_argument("--grad-clip", type=float, default=defaults.grad_clip, help="clip gradient norm; 0 disables (default: %(default)s)")
    g.add_argument("--eval-interval", type=int, default=defaults.eval_interval, help="steps between evaluations and checkpoints (default: %(default)s)")
    g.add_argument("--log-interval", type=int, default=defaults.log_interval,
                   help="steps between train-loss rows in metrics.csv (default: %(default)s; none: at evaluations)")
    g.add_argument("--eval-batches", type=int, default=defaults.eval_batches, help="validation batches per evaluation (default: all)")
    g.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    g.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    g.add_argument("--precision", default=defaults.precision, choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision; auto is bf16 on a capable GPU, else fp32 (default: %(default)s)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model: for GPUs, after a warm-up. On the CPU it loses gptlab's oneDNN "
                   "kernels (0.55x the default at the 124M shape here; BENCHMARKS.md)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 100) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; higher is more random (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="sample only from the smallest set holding this probability")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    g.add_argument("--no-cache", action="store_true", help="recompute every step instead of using the KV cache")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling settings, checked: call it before loading a model, so a bad value fails at once."""
    from gptlab.generate import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=args.stop, use_cache=not args.no_cache)


# ---- subcommands --------------------------------------------------------------------------------

def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a text file or folder into a memory-mapped token file",
                       description="Tokenize INPUT (a UTF-8 text file, or a folder of them, joined by <|endoftext|>) "
                                   "once into a token file that `gptlab pretrain --data` memory-maps.")
    p.add_argument("input", help="text file or folder")
    p.add_argument("--out", required=True, help="token file to write, e.g. data/corpus.tokens")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a saved tokenizer directory (default: %(default)s)")
    p.set_defaults(run=run_prepare)


def run_prepare(args) -> None:
    from gptlab.data import prepare_token_file
    from gptlab.tokenizer import get_tokenizer

    header = prepare_token_file(args.input, args.out, get_tokenizer(args.tokenizer))
    print(f"wrote {args.out}: {header['n_tokens']:,} tokens ({header['dtype']}) from {header['n_files']} file(s)")


def add_pretrain(sub) -> None:
    from gptlab.model import PRESETS

    p = sub.add_parser("pretrain", help="train a GPT from scratch (or continue one) on text",
                       description="Next-token pretraining. Writes a run directory (weights, config, metrics.csv, "
                                   "loss.png, resumable state) that generate/fine-tune/serve read.")
    p.add_argument("--data", required=True, help="text file, folder, or token file from `gptlab prepare`")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--preset", default="demo", choices=list(PRESETS), help="model size (default: %(default)s)")
    p.add_argument("--init", default=None, help="start from this model (run directory, ...) instead of random weights")
    p.add_argument("--tokenizer", default=None, help="'gpt2' (default) or a saved tokenizer directory")
    p.add_argument("--context-length", type=int, default=None, help="override the preset's context length")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--stride", type=int, default=None, help="tokens between training windows (default: context length)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of tokens for validation (default: %(default)s)")
    p.add_argument("--sample-prompt", default="Every effort moves you", help="prompt sampled at each evaluation ('' for none)")
    add_train_arguments(p, TrainConfig(epochs=10, batch_size=8, lr=4e-4, eval_interval=20, log_interval=10))
    p.set_defaults(run=run_pretrain)


def run_pretrain(args) -> int:
    from gptlab.pretrain import pretrain

    result = pretrain(
        args.data, args.out, preset=args.preset, train_config=train_config_from_args(args), init=args.init,
        tokenizer=args.tokenizer, context_length=args.context_length, dropout=args.dropout, stride=args.stride,
        val_fraction=args.val_fraction, sample_prompt=args.sample_prompt or None, resume=args.resume,
        overwrite=args.overwrite, progress=not args.quiet,
    )
    val = f", val loss {result.val_loss:.3f}" if result.val_loss is not None else ""
    print(f"{'stopped' if result.interrupted else 'done'}: step {result.step}, train loss {result.train_loss:.3f}{val}; "
          f"run saved in {args.out}" + (" (continue with --resume)" if result.interrupted else ""))
    return 130 if result.interrupted else 0


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model, streaming",
                       description="Print PROMPT and stream the model's continuation token by token.")
    p.add_argument("--model", required=True, help="run directory (or other model source)")
    p.add_argument("--prompt", required=True, help="text to continue")
    add_sampling_arguments(p)
    p.set_defaults(run=run_generate)


def run_generate(args) -> None:
    from gptlab.generate import stream_text
    from gptlab.device import select_device
    from gptlab.weights import load

    sampling = sampling_kwargs(args)
    model, tokenizer = load(args.model, device=select_device(args.device))
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for piece in stream_text(model, tokenizer, args.prompt, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a model in another ecosystem's format (Hugging Face)",
                       description="Write SOURCE (a run directory, gpt2, a hub id, an HF/TF folder or a book .pth) "
                                   "to OUT_DIR as config.json + model.safetensors, which "
                                   "transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR) loads.")
    p.add_argument("--format", required=True, choices=["hf"], help="hf: Hugging Face transformers' GPT-2")
    p.add_argument("source", help="model to export")
    p.add_argument("out_dir", help="folder to write")
    p.set_defaults(run=run_export)


def run_export(args) -> None:
    from gptlab.weights import export_hf, load

    model, tokenizer = load(args.source)
    export_hf(model, args.out_dir, tokenizer)
    print(f"wrote {args.out_dir}: Hugging Face GPT-2 ({model.num_parameters() / 1e6:.1f}M parameters)")


def add_train_tokenizer(sub) -> None:
    p = sub.add_parser("train-tokenizer", help="learn a byte-level BPE vocabulary from text",
                       description="Learn a GPT-2-style byte-level BPE vocabulary from CORPUS and write it to DIR "
                                   "(tiktoken's bpe.tiktoken and GPT-2's encoder.json + vocab.bpe); "
                                   "`gptlab pretrain --tokenizer DIR` then trains with it.")
    p.add_argument("--input", required=True, nargs="+", metavar="CORPUS", help="UTF-8 text file(s) to learn from")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N", help="tokens in all: 256 bytes + merges + special tokens")
    p.add_argument("--out", required=True, metavar="DIR", help="tokenizer directory to write")
    p.add_argument("--special", action="append", default=None, metavar="TEXT",
                   help="special token text (repeatable; default: <|endoftext|>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_train_tokenizer)


def run_train_tokenizer(args) -> None:
    from gptlab.bpe import train_bpe_files

    specials = args.special if args.special is not None else ["<|endoftext|>"]
    tokenizer = train_bpe_files(args.input, args.vocab_size, special_tokens=specials, progress=not args.quiet)
    tokenizer.save(args.out)
    print(f"wrote {args.out}: {tokenizer.n_vocab:,} tokens ({len(tokenizer.merges):,} merges, "
          f"special {', '.join(tokenizer.special_tokens) or 'none'})")


# ---- instruction fine-tuning, chat, respond, judge ----------------------------------------------

def add_finetune_instruct(sub) -> None:
    from gptlab.model import PRESETS
    from gptlab.prompts import PROMPT_STYLES

    p = sub.add_parser("finetune-instruct", help="fine-tune a model to follow instructions (Alpaca-style records)",
                       description="Full fine-tuning on instruction/input/output records, laid out in a prompt "
                                   "style. Writes a run directory (with the held-out test.json and val.json) that "
                                   "chat and respond read; the prompt style is stored in its config.json.")
    p.add_argument("--data", default=None, help="JSON list or JSONL of {instruction, input, output} records "
                                                "(default: the shipped 1,100-record instruction-data.json)")
    p.add_argument("--out", required=True, help="run directory to write")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", help="model to start from: a run directory, gpt2, gpt2-medium, an HF folder, ...")
    start.add_argument("--preset", choices=list(PRESETS), help="start from random weights of this size instead")
    p.add_argument("--tokenizer", default=None, help="with --preset: 'gpt2' (default) or a saved tokenizer directory")
    p.add_argument("--prompt-style", default="alpaca", choices=list(PROMPT_STYLES), help="prompt layout (default: %(default)s)")
    p.add_argument("--mask-prompt", action="store_true", help="learn only the responses (no loss on the prompt's tokens)")
    p.add_argument("--max-length", type=int, default=None, help="cut examples to this many tokens (default: the context length)")
    p.add_argument("--dropout", type=float, default=None, help="override the model's dropout")
    p.add_argument("--train-fraction", type=float, default=0.85, help="first part of the records for training (default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=0.10, help="next part, written to OUT/test.json (default: %(default)s); "
                                                                      "the rest validates")
    p.add_argument("--split-seed", type=int, default=None, help="shuffle the records with this seed before splitting "
                                                                "(default: file order, as in the book)")
    add_train_arguments(p, TrainConfig(epochs=2, batch_size=8, lr=5e-5, eval_interval=20))
    p.set_defaults(run=run_finetune_instruct)


def run_finetune_instruct(args) -> int:
    from gptlab.finetune.instruct import finetune_instruct
    from gptlab.run import read_run_config

    result = finetune_instruct(
        args.data, args.out, init=args.init, preset=args.preset, tokenizer=args.tokenizer, prompt_style=args.prompt_style,
        train_config=train_config_from_args(args), mask_prompt=args.mask_prompt, max_length=args.max_length,
        dropout=args.dropout, train_fraction=args.train_fraction, test_fraction=args.test_fraction,
        split_seed=args.split_seed, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
    )
    before = read_run_config(args.out).get("initial_val_loss")
    val = ""
    if result.val_loss is not None:
        val = f", val loss {before:.3f} -> {result.val_loss:.3f}" if before is not None else f", val loss {result.val_loss:.3f}"
    print(f"{'stopped' if result.interrupted else 'done'}: step {result.step}, train loss {result.train_loss:.3f}{val}; "
          f"run saved in {args.out}" + (" (continue with --resume)" if result.interrupted else
                                        f"\nnext: gptlab respond --model {args.out} --output {args.out}/responses.json"))
    return 130 if result.interrupted else 0


def _load_instruct_model(args):
    from gptlab.finetune.instruct import model_prompt_style
    from gptlab.device import select_device
    from gptlab.weights import load

    model, tokenizer = load(args.model, device=select_device(args.device))
    return model, tokenizer, model_prompt_style(args.model, args.prompt_style)


def add_respond(sub) -> None:
    from gptlab.prompts import PROMPT_STYLES

    p = sub.add_parser("respond", help="answer every instruction of a file with a model, for `gptlab judge`",
                       description="Write each record of --input with the model's answer added (key --key).")
    p.add_argument("--model", required=True, help="fine-tuned run directory (or other model source)")
    p.add_argument("--input", default=None, help="JSON/JSONL records (default: MODEL/test.json from finetune-instruct)")
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--key", default="model_response", help="key of the answer in each record (default: %(default)s)")
    p.add_argument("--prompt-style", default=None, choices=list(PROMPT_STYLES),
                   help="default: the style the model was fine-tuned with, else alpaca")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N records")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sampling_arguments(p, max_new_tokens=256)
    p.set_defaults(run=run_respond)


def run_respond(args) -> None:
    import json
    from pathlib import Path

    from gptlab.finetune.instruct import TEST_FILE, load_instruction_records, respond
    from gptlab.run import atomic_write_text

    sampling = sampling_kwargs(args)
    source = args.input or Path(args.model) / TEST_FILE
    if args.input is None and not Path(source).is_file():
        raise GptlabError(f"no --input given and {source} does not exist; pass --input FILE")
    records = load_instruction_records(source)[:args.limit]
    model, tokenizer, style = _load_instruct_model(args)
    answered = respond(model, tokenizer, style, records, key=args.key, progress=not args.quiet, **sampling)
    atomic_write_text(args.output, json.dumps(answered, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.output}: {len(answered)} records answered in the {style.name} style\n"
          f"next: gptlab judge --input {args.output}   (or --offline for ROUGE-L and exact match only)")


def add_chat(sub) -> None:
    from gptlab.prompts import PROMPT_STYLES

    p = sub.add_parser("chat", help="talk to an instruction-tuned model, streaming",
                       description="Interactive multi-turn chat in the model's prompt style; old turns are dropped "
                                   "when the conversation outgrows the context. /reset, /exit; Ctrl-C stops an answer.")
    p.add_argument("--model", required=True, help="fine-tuned run directory (or other model source)")
    p.add_argument("--prompt-style", default=None, choices=list(PROMPT_STYLES),
                   help="default: the style the model was fine-tuned with, else alpaca")
    p.add_argument("--system", default=None, help="system text that replaces the style's preamble")
    add_sampling_arguments(p, max_new_tokens=256)
    p.set_defaults(run=run_chat)


def run_chat(args) -> None:
    from gptlab.chat import chat

    sampling = sampling_kwargs(args)
    model, tokenizer, style = _load_instruct_model(args)
    chat(model, tokenizer, style, system=args.system, **sampling)


def add_judge(sub) -> None:
    import os

    p = sub.add_parser("judge", help="score model answers 0-100 with an LLM judge, plus ROUGE-L and exact match",
                       description="Score each record's answer (--key) against its reference 'output' with an LLM "
                                   "over an OpenAI-compatible chat-completions API (Ollama, OpenAI, gptlab serve). "
                                   "Scores are cached beside the output, so an interrupted run resumes.")
    p.add_argument("--input", required=True, help="records with answers, from `gptlab respond`")
    p.add_argument("--output", default=None, help="scored records (default: INPUT.judged.json; histogram .png beside it)")
    p.add_argument("--key", default="model_response", help="key of the answer in each record (default: %(default)s)")
    p.add_argument("--offline", action="store_true", help="no judge: ROUGE-L and exact match only")
    p.add_argument("--base-url", default=os.environ.get("GPTLAB_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
                   or "http://localhost:11434/v1",
                   help="chat-completions endpoint (env GPTLAB_JUDGE_BASE_URL or OPENAI_BASE_URL; default: %(default)s, Ollama)")
    p.add_argument("--judge-model", default=os.environ.get("GPTLAB_JUDGE_MODEL") or "llama3",
                   help="judge model name (env GPTLAB_JUDGE_MODEL; default: %(default)s)")
    p.add_argument("--api-key", default=None, help="API key (better: env GPTLAB_JUDGE_API_KEY or OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each reply (default: %(default)s)")
    p.add_argument("--retries", type=int, default=3, help="retries of a timed-out or failed request (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_judge)


def run_judge(args) -> None:
    import os

    from gptlab.evaluate import JudgeClient, evaluate_responses

    client = None
    if not args.offline:
        key = args.api_key or os.environ.get("GPTLAB_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        client = JudgeClient(args.base_url, args.judge_model, key, timeout=args.timeout, retries=args.retries)
    s = evaluate_responses(args.input, args.output, args.key, client, progress=not args.quiet)
    print(f"{s['n']} records: ROUGE-L {s['rouge_l']:.4f}, exact match {s['exact_match']:.2%}")
    if client is not None:
        mean = f"{s['judge_mean']:.2f}/100" if s["judge_mean"] is not None else "n/a"
        print(f"judge {s['judge_model']} at {s['judge_url']}: mean score {mean} over {s['judged']} records"
              + (f" ({s['unscored']} unscored; run again to retry them)" if s["unscored"] else ""))
        print(s["text_histogram"])
    print(f"wrote {s['output']}" + (f" and {s['plot']}" if s.get("plot") else ""))


def add_serve(sub) -> None:
    # Unset limits take gptlab.serve.ServeLimits' defaults in run_serve: importing it here would load
    # FastAPI for every gptlab command.
    p = sub.add_parser("serve", help="serve a model over HTTP: OpenAI-compatible API and a chat page",
                       description="Serve SOURCE at http://HOST:PORT/ (a chat page) and /v1 (OpenAI's completions, "
                                   "chat completions and models API, streaming; /v1/classify for a classifier run). "
                                   "Needs the serve extra: pip install 'gptlab[serve]'.")
    p.add_argument("--model", required=True, help="run directory (or other model source)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $GPTLAB_API_KEY if set)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the run directory's name)")
    p.add_argument("--prompt-style", default=None, help="chat prompt style (default: the run's, else alpaca)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    g = p.add_argument_group("limits (defaults: 1024, 256, 1000000, 4, 64, 8)")
    g.add_argument("--max-tokens-limit", type=int, help="most new tokens a request may ask for")
    g.add_argument("--default-max-tokens", type=int, help="new tokens when a request does not say")
    g.add_argument("--max-request-bytes", type=int, help="largest request body")
    g.add_argument("--max-n", type=int, help="most choices per prompt")
    g.add_argument("--max-queue", type=int, help="requests that may wait; more get 503")
    g.add_argument("--max-active", type=int, help="generations interleaved at once")
    p.set_defaults(run=run_serve)


def run_serve(args) -> None:
    import dataclasses
    import os

    try:
        from gptlab.serve import API_KEY_ENV, ServeLimits, serve
    except ImportError as e:
        raise GptlabError(f"serving needs FastAPI and uvicorn ({e}); pip install 'gptlab[serve]'") from None
    given = dict(max_tokens=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                 max_request_bytes=args.max_request_bytes, max_n=args.max_n, max_queue=args.max_queue,
                 max_active=args.max_active)
    limits = ServeLimits()
    if args.max_tokens_limit is not None and args.default_max_tokens is None:  # keep the default under the limit
        given["default_max_tokens"] = min(limits.default_max_tokens, args.max_tokens_limit)
    limits = dataclasses.replace(limits, **{k: v for k, v in given.items() if v is not None})
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
          limits=limits, device=args.device, name=args.model_name, prompt_style=args.prompt_style)


# ---- classification fine-tuning and classify ----------------------------------------------------

def add_finetune_classifier(sub) -> None:
    from gptlab.finetune.classifier import DEFAULT_PRESET, PADDING, TRAINABLE_PARTS, stage_defaults
    from gptlab.model import PRESETS

    scratch, pretrained = stage_defaults(None), stage_defaults("gpt2")
    p = sub.add_parser("finetune-classifier", help="fine-tune a GPT to label texts (spam or ham, ...)",
                       description="Replace the output head with a NUM_CLASSES-wide one and train on a file of "
                                   "labelled texts (CSV/TSV/JSONL, or the SMS Spam Collection's label<TAB>text). "
                                   "Writes a run directory with metrics.csv, loss.png, accuracy.png, "
                                   "evaluation.json and confusion_matrix.png that `gptlab classify` reads.")
    p.add_argument("--data", required=True, help="labelled texts, e.g. data/SMSSpamCollection")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--init", default=None, help="start from this model (gpt2, a run directory, an HF folder, ...) "
                                               "instead of random weights")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                   help="model size when starting from random weights (default: %(default)s)")
    p.add_argument("--text-column", default="text", help="column name or 0-based position of the text (default: %(default)s)")
    p.add_argument("--label-column", default="label", help="column name or 0-based position of the label (default: %(default)s)")
    p.add_argument("--header", default="auto", choices=["auto", "yes", "no"],
                   help="whether the first row names the columns; auto: yes if it names a column or the file is "
                        ".csv/.tsv (default: %(default)s)")
    p.add_argument("--balance", action="store_true", help="down-sample every label to the rarest one's count (the book)")
    p.add_argument("--split", type=float, nargs=3, default=[0.7, 0.1, 0.2], metavar=("TRAIN", "VAL", "TEST"),
                   help="stratified split fractions (default: 0.7 0.1 0.2)")
    p.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens "
                                                              "(default: the longest training text, up to the context length)")
    p.add_argument("--padding", default="batch", choices=PADDING,
                   help="pad to the batch's longest text, the split's longest (the book) or --max-length "
                        "(default: %(default)s; the prediction is the same either way)")
    p.add_argument("--trainable", default="auto", choices=["auto", *TRAINABLE_PARTS],
                   help="parameters to train; auto: last-block (+ final norm + head) with --init, all from scratch")
    p.add_argument("--context-length", type=int, default=None, help="override the preset's context length")
    p.add_argument("--dropout", type=float, default=None, help="override the model's dropout")
    add_train_arguments(p, TrainConfig(epochs=scratch["epochs"], batch_size=scratch["batch_size"], lr=scratch["lr"]))
    p.set_defaults(run=run_finetune_classifier, epochs=None, lr=None, batch_size=None, eval_interval=None)
    for action in p._actions:  # the defaults depend on --init: say both
        if action.dest in scratch:
            action.help = (f"{action.help.split(' (default')[0]} (default: {scratch[action.dest]} from scratch, "
                           f"{pretrained[action.dest]} with --init)")
        elif action.dest == "eval_interval":
            action.help = "steps between evaluations and checkpoints (default: once per epoch)"


def run_finetune_classifier(args) -> int:
    from gptlab.finetune.classifier import finetune_classifier, stage_defaults

    per_epoch = args.eval_interval is None
    for name, value in stage_defaults(args.init).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if per_epoch:
        args.eval_interval = 1  # replaced by the number of steps in an epoch once the data is read
    result = finetune_classifier(
        args.data, args.out, init=args.init, preset=args.preset, train_config=train_config_from_args(args),
        text_column=args.text_column, label_column=args.label_column, header=args.header, balance=args.balance,
        split=args.split, max_length=args.max_length, padding=args.padding, trainable=args.trainable,
        context_length=args.context_length, dropout=args.dropout, eval_each_epoch=per_epoch, resume=args.resume,
        overwrite=args.overwrite, progress=not args.quiet,
    )
    if result.train.interrupted:
        print(f"stopped at step {result.train.step}; run saved in {args.out} (continue with --resume)")
        return 130
    for name in ("train", "val", "test"):
        if name in result.reports:
            r = result.reports[name]
            print(f"{name:>5} accuracy {r.accuracy:.2%} ({r.total} examples)")
    if "test" in result.reports:
        print(f"test set:\n{result.reports['test'].format()}")
    if result.left_out:
        lo = result.left_out
        line = f"left out by balancing: {lo['n']} examples, accuracy {lo['accuracy']:.2%}"
        if "false_positive_rate" in lo:
            line += f", false-positive rate {lo['false_positive_rate']:.2%} (predicted {lo['positive']!r})"
        print(line)
    print(f"run saved in {args.out} (evaluation.json, confusion_matrix.png, accuracy.png); "
          f"next: gptlab classify --model {args.out} \"some text\"")
    return 0


def add_classify(sub) -> None:
    p = sub.add_parser("classify", help="label texts with a trained classifier",
                       description="Print the predicted label and its probability for each TEXT, or classify "
                                   "every text of --input (a .txt file with one text per line, or CSV/TSV/JSONL "
                                   "with a text column) into --output. When --input has a label column too, "
                                   "accuracy, per-class precision/recall/F1 and the confusion matrix are printed.")
    p.add_argument("--model", required=True, help="run directory written by finetune-classifier")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="text(s) to classify")
    p.add_argument("--input", default=None, help="file of texts to classify")
    p.add_argument("--output", default=None, help="file to write (.jsonl, .csv, else tab-separated; default: stdout)")
    p.add_argument("--text-column", default="text", help="--input's text column, name or 0-based position (default: %(default)s)")
    p.add_argument("--label-column", default="label", help="--input's label column, if any (default: %(default)s)")
    p.add_argument("--header", default="auto", choices=["auto", "yes", "no"], help="whether --input's first row names the columns")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.set_defaults(run=run_classify)


def run_classify(args) -> None:
    from gptlab.finetune.classifier import Classifier, classify_file
    from gptlab.device import select_device

    if bool(args.texts) == bool(args.input):
        raise GptlabError("give either TEXT arguments or --input FILE (one of them)")
    if args.output and not args.input:
        raise GptlabError("--output needs --input")
    if args.batch_size <= 0:
        raise GptlabError(f"batch-size must be positive, got {args.batch_size}")
    classifier = Classifier.load(args.model, device=select_device(args.device))
    if args.texts:
        for text, pred in zip(args.texts, classifier.predict(args.texts, args.batch_size)):
            print(f"{pred.label}\t{pred.probability:.4f}" + (f"\t{text}" if len(args.texts) > 1 else ""))
        return
    report = classify_file(classifier, args.input, args.output, text_column=args.text_column,
                           label_column=args.label_column, header=args.header, batch_size=args.batch_size)
    if args.output:
        print(f"wrote {args.output}")
    if report is not None:
        print(report.format(), file=sys.stderr if not args.output else sys.stdout)


COMMANDS = [add_prepare, add_pretrain, add_generate, add_export, add_train_tokenizer,
            add_finetune_instruct, add_respond, add_chat, add_judge, add_serve,
            add_finetune_classifier, add_classify]


def build_parser() -> argparse.ArgumentParser:
    from gptlab import __version__

    parser = argparse.ArgumentParser(
        prog="gptlab",
        description="A from-scratch GPT toolkit: tokenize, pretrain, fine-tune, generate, serve.",
        epilog="Run `gptlab COMMAND --help` for a command's options.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    # no prefix matching: `classify --text hi` must be an error, not a silent `--text-column hi`
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False))
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("gptlab").setLevel(logging.INFO)
    try:
        return args.run(args) or 0
    except GptlabError as e:
        print(f"gptlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError) as e:  # mkdir met a file where a directory has to go
        print(f"gptlab {args.command}: error: {e.filename}: a file stands where a directory has to be created; "
              f"choose another output path", file=sys.stderr)
        return 2
    except OSError as e:  # permission denied, disk full, ...: the system's own words, on one line
        print(f"gptlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
