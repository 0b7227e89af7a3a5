"""The ``gptlab`` command: argument parsing only; every subcommand calls the library in a few lines.

Options and their ``--help`` defaults are built from the typed settings in ``gptlab.config``, so the
command line and the Python API share one set of defaults. An option the user did not give is left
out (``argparse.SUPPRESS``), and the library fills in its own default: nothing is typed twice.

A ``GptlabError`` (a mistake the user can fix) prints one line and exits with status 2. Importing this
module and ``gptlab --help`` load no torch: each subcommand imports what it needs when it runs.
To add a subcommand: write ``add_<name>(subparsers)`` that registers it with ``set_defaults(run=...)``
and list it in ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
import types
import typing
from dataclasses import fields, replace

from gptlab.config import (
    API_KEY_ENV, DEFAULT_HOST, DEFAULT_PORT, DPO_TRAINING, INSTRUCT_TRAINING, LORA_LR, JUDGE_BASE_URL, JUDGE_MAX_TOKENS, JUDGE_MODEL, PRETRAIN_TRAINING, ClassifierSettings, InstructSettings,
    PretrainSettings, SamplingConfig, ServeLimits, TrainConfig, classifier_training,
)
from gptlab.config import DPOSettings
from gptlab.config import INT4_GROUP_SIZES, QUANTIZE_KINDS
from gptlab.errors import GptlabError

log = logging.getLogger("gptlab")

TRAINING_COMMANDS = ("pretrain", "finetune-classifier", "finetune-instruct", "finetune-dpo")


# ---- options from dataclasses -------------------------------------------------------------------

def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_options(group, cls, defaults=None, skip: tuple[str, ...] = (), shown: dict[str, str] | None = None) -> None:
    """One option per documented field of the dataclass ``cls``; ``--help`` shows ``defaults``' value.

    ``shown`` replaces the default text of some fields (a default that depends on another option).
    """
    hints = typing.get_type_hints(cls)
    own = cls.__dict__.get("__annotations__", {})  # a class's own fields first, then those it inherits
    for f in sorted(fields(cls), key=lambda f: f.name not in own):
        if f.name in skip or "help" not in f.metadata:
            continue
        meta, kind = f.metadata, hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else f.default
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS}
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        base = args[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) else kind  # X | None: X
        if base is bool and meta.get("flag", "").startswith("--no-"):
            kwargs.update(action="store_const", const=False)  # a None default: the preset decides
        elif base is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(base) is tuple and typing.get_args(base)[-1] is Ellipsis:
            kwargs.update(action="append", type=typing.get_args(base)[0])
        elif typing.get_origin(base) is tuple:
            kwargs.update(nargs=len(typing.get_args(base)), type=typing.get_args(base)[0])
        else:
            kwargs["type"] = base
        for extra in ("choices", "metavar", "required"):
            if extra in meta:
                kwargs[extra] = meta[extra]
        text = meta["help"]
        if shown and f.name in shown:
            text += f" (default: {shown[f.name]})"
        elif default is not None and default is not False and default != () and not meta.get("required"):
            text += f" (default: {_show(default)})"
        group.add_argument(meta.get("flag", "--" + f.name.replace("_", "-")), help=text.replace("%", "%%"), **kwargs)


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` that the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def add_train_arguments(p: argparse.ArgumentParser, defaults: TrainConfig, shown: dict[str, str] | None = None) -> None:
    """The training loop's options, with a stage's own defaults shown in --help."""
    g = p.add_argument_group("training")
    add_options(g, TrainConfig, defaults, shown=shown)
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly where it stopped, with its own settings and data; only a "
                        "larger --max-steps/--epochs (the extra steps run at the schedule's final lr) or another "
                        "--device may be given besides")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def train_config(args: argparse.Namespace, defaults: TrainConfig) -> TrainConfig:
    return replace(defaults, **given(args, TrainConfig))


def train_options(args: argparse.Namespace) -> dict:
    """The training options the user typed: the stage adds its defaults, or on --resume compares them with the
    run's own (``gptlab.run.start_stage``)."""
    return given(args, TrainConfig)


def stopped_status(result) -> int:
    """A run stopped by a signal exits as the shell reports one: 128 + its number (SIGINT 130, SIGTERM 143).
    Under torchrun 0: the stop is the plan (every rank checkpointed), and the launcher takes non-zero as a failure."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return 0
    return 128 + (result.stop_signal or 2) if result.interrupted else 0


def add_sampling_arguments(p: argparse.ArgumentParser, defaults: SamplingConfig = SamplingConfig()) -> None:
    g = p.add_argument_group("sampling")
    add_options(g, SamplingConfig, defaults)
    g.add_argument("--no-cache", action="store_true", help="recompute every step instead of using the KV cache")
    add_device_argument(g)
    p.set_defaults(sampling_defaults=defaults)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling settings, checked: call it before loading a model, so a bad value fails at once."""
    sampling = replace(args.sampling_defaults, **given(args, SamplingConfig))
    return {**sampling.kwargs(), "use_cache": not args.no_cache}


def add_device_argument(p) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="hold the weights in float32 or bfloat16 (half the memory and the bytes read per token; "
                        "refused on a device without native bf16; default: %(default)s)")


def load_options(args) -> dict:
    """``--device`` and ``--dtype`` as the loaders take them (``device=``, ``dtype=``), checked."""
    from gptlab.device import inference_dtype, select_device

    device = select_device(args.device)
    return {"device": device, "dtype": inference_dtype(args.dtype, device)}


def add_quantize_arguments(p) -> None:
    """--quantize and --group-size of the using commands: int8/int4 weights made as the model loads."""
    p.add_argument("--quantize", default=None, choices=QUANTIZE_KINDS,
                   help="hold the linear layers' weights as int8 (per output channel) or int4 (groups with a zero "
                        "point), quantized as the model loads (README: Low precision)")
    add_group_size_argument(p)


def add_group_size_argument(p) -> None:
    p.add_argument("--group-size", type=int, default=None, metavar="N",
                   help=f"int4: inputs per group, one of {', '.join(map(str, sorted(INT4_GROUP_SIZES)))} (default: "
                        "the largest that divides every layer)")


def quantize_option(args, to: str | None = None):
    """The ``QuantizeConfig`` of --quantize (or ``to``) and --group-size; None when not asked for."""
    from gptlab.config import QuantizeConfig

    to = to or args.quantize
    if to is None:
        if args.group_size is not None:
            raise GptlabError("--group-size applies to --quantize int4; add --quantize int4 or leave it out")
        return None
    return QuantizeConfig(to, args.group_size)


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
    from gptlab.files import check_output_file
    from gptlab.tokenizer import get_tokenizer

    check_output_file(args.out, [args.input], "--out")  # before tokenizing a corpus for minutes
    header = prepare_token_file(args.input, args.out, get_tokenizer(args.tokenizer))
    print(f"wrote {args.out}: {header['n_tokens']:,} tokens ({header['dtype']}) from {header['n_files']} file(s)")


def add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="train a GPT from scratch (or continue one) on text",
                       description="Next-token pretraining. Writes a run directory (weights, config, metrics.csv, "
                                   "loss.png, resumable state) that generate/fine-tune/serve read.")
    add_options(p, PretrainSettings)
    p.add_argument("--out", required=True, help="run directory to write")
    add_train_arguments(p, PRETRAIN_TRAINING)
    p.set_defaults(run=run_pretrain)


def run_pretrain(args) -> int:
    from gptlab.pretrain import pretrain

    options = given(args, PretrainSettings)
    if options.get("sample_prompt") == "":
        options["sample_prompt"] = None
    result = pretrain(options.pop("data", None), args.out, train_config=train_options(args), resume=args.resume,
                      overwrite=args.overwrite, progress=not args.quiet, **options)
    val = f", val loss {result.val_loss:.3f}" if result.val_loss is not None else ""
    print(f"{'stopped' if result.interrupted else 'done'}: step {result.step}, train loss {result.train_loss:.3f}{val}; "
          f"run saved in {args.out}" + (" (continue with --resume)" if result.interrupted else ""))
    return stopped_status(result)


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model, streaming",
                       description="Print PROMPT and stream the model's continuation token by token.")
    p.add_argument("--model", required=True, help="run directory (or other model source)")
    p.add_argument("--prompt", required=True, help="text to continue")
    add_sampling_arguments(p)
    add_quantize_arguments(p)
    p.set_defaults(run=run_generate)


def run_generate(args) -> None:
    from gptlab.generate import generate_texts, stream_text
    from gptlab.speculative import SpeculationStats
    from gptlab.weights import load, require_language_model

    sampling = sampling_kwargs(args)
    model, tokenizer = load(args.model, quantize=quantize_option(args), **load_options(args))
    require_language_model(model, args.model, "generate")
    load_draft(sampling, model, tokenizer)
    n = sampling["num_return_sequences"]
    if n > 1:  # several answers: each printed whole once all are done
        for i, text in enumerate(generate_texts(model, tokenizer, args.prompt, **sampling), 1):
            print(f"--- {i} of {n} ---\n{args.prompt}{text}")
        return
    speculation = SpeculationStats()
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for piece in stream_text(model, tokenizer, args.prompt, speculation=speculation, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if speculation.proposed:
        log.info("speculative decoding: %d of %d guessed tokens kept (%.0f%%) in %d checks", speculation.accepted,
                 speculation.proposed, 100 * speculation.acceptance_rate, speculation.rounds)


def load_draft(sampling: dict, model, tokenizer) -> None:
    """--draft SOURCE: load the draft model beside the model and put it in ``sampling`` in place of its source."""
    if sampling.get("draft") is None:
        return
    from gptlab.generate import check_draft
    from gptlab.weights import load, require_language_model

    source = sampling["draft"]
    weight = next(model.parameters())
    draft, draft_tokenizer = load(source, device=weight.device, dtype=weight.dtype)  # the model's --device, --dtype
    require_language_model(draft, source, "--draft")
    check_draft(model, draft, tokenizer, draft_tokenizer, name=f"--draft {source}")
    sampling["draft"] = draft


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a model in another format: Hugging Face, PEFT adapters, a standalone run",
                       description="Write SOURCE (a run directory, a LoRA run, a PEFT adapter folder, gpt2, a hub id, "
                                   "an HF/TF folder or a book .pth) to OUT_DIR. --format hf: config.json + "
                                   "model.safetensors, which transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR) "
                                   "loads. --format peft: a LoRA run's adapters as adapter_config.json + "
                                   "adapter_model.safetensors, which peft.PeftModel.from_pretrained(BASE, OUT_DIR) "
                                   "loads on the base (BASE: the base exported with --format hf). --format run: an "
                                   "ordinary gptlab run directory. A LoRA source needs --merge for hf and run: the "
                                   "adapters are folded into the weights, and the result needs no base.")
    p.add_argument("--format", required=True, choices=["hf", "peft", "run"],
                   help="hf: Hugging Face transformers' GPT-2; peft: Hugging Face PEFT's LoRA adapter (of a LoRA "
                        "run; base_model_name_or_path names the run's base); run: a gptlab run directory")
    p.add_argument("source", help="model to export")
    p.add_argument("out_dir", help="folder to write (a new or empty one; never SOURCE itself)")
    p.add_argument("--merge", action="store_true",
                   help="fold a LoRA source's adapters into its weights (needed by --format hf and run for a LoRA "
                        "run or PEFT folder); the merged model stands alone, without the base")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that is not empty: the model files a loader would read (config.json, "
                        "model.safetensors, a shard index, pytorch_model.bin, PEFT's adapter files) are replaced, "
                        "other files stay")
    p.set_defaults(run=run_export)


def run_export(args) -> None:
    from gptlab.weights import export_model

    print(export_model(args.source, args.out_dir, args.format, merge=args.merge, overwrite=args.overwrite))


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
    from pathlib import Path

    from gptlab.bpe import train_bpe_files
    from gptlab.files import check_writable_dir

    if any(Path(path).is_dir() for path in args.input):
        raise GptlabError(f"--input {next(p for p in args.input if Path(p).is_dir())} is a folder; give text file(s)")
    if Path(args.out).is_file():
        raise GptlabError(f"--out {args.out} is a file; give a folder for the tokenizer's files")
    check_writable_dir(args.out, "--out")  # before learning merges for minutes
    specials = args.special if args.special is not None else ["<|endoftext|>"]
    tokenizer = train_bpe_files(args.input, args.vocab_size, special_tokens=specials, progress=not args.quiet)
    tokenizer.save(args.out)
    print(f"wrote {args.out}: {tokenizer.n_vocab:,} tokens ({len(tokenizer.merges):,} merges, "
          f"special {', '.join(tokenizer.special_tokens) or 'none'})")


# ---- instruction fine-tuning, chat, respond, judge ----------------------------------------------

def add_finetune_instruct(sub) -> None:
    p = sub.add_parser("finetune-instruct", help="fine-tune a model to follow instructions (Alpaca-style records)",
                       description="Full fine-tuning (or LoRA adapters, --lora) on instruction/input/output records, laid out in a prompt "
                                   "style. Writes a run directory (with the held-out test.json and val.json) that "
                                   "chat and respond read; the prompt style is stored in its config.json. "
                                   "Give --init or --preset.")
    add_options(p, InstructSettings)
    p.add_argument("--out", required=True, help="run directory to write")
    add_train_arguments(p, INSTRUCT_TRAINING, shown={"lr": f"{INSTRUCT_TRAINING.lr}, {LORA_LR['instruct']} with --lora"})
    p.set_defaults(run=run_finetune_instruct)


def run_finetune_instruct(args) -> int:
    from gptlab.finetune.instruct import finetune_instruct
    from gptlab.run import read_run_config

    options = given(args, InstructSettings)
    result = finetune_instruct(options.pop("data", None), args.out, train_config=train_options(args),
                               resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, **options)
    before = read_run_config(args.out).get("initial_val_loss")
    val = ""
    if result.val_loss is not None:
        val = f", val loss {before:.3f} -> {result.val_loss:.3f}" if before is not None else f", val loss {result.val_loss:.3f}"
    print(f"{'stopped' if result.interrupted else 'done'}: step {result.step}, train loss {result.train_loss:.3f}{val}; "
          f"run saved in {args.out}" + (" (continue with --resume)" if result.interrupted else
                                        f"\nnext: gptlab respond --model {args.out} --output {args.out}/responses.json"))
    return stopped_status(result)


def _load_instruct_model(args, sampling: dict | None = None):
    """The model, its tokenizer and prompt style; with ``sampling``, also the --draft model, loaded into it."""
    from gptlab.respond import model_prompt_style
    from gptlab.weights import load, require_language_model

    if sampling is not None and sampling["num_return_sequences"] != 1:
        raise GptlabError(f"{args.command} gives one answer per {'turn' if args.command == 'chat' else 'record'}; "
                          "drop --num-return-sequences (gptlab generate prints several)")
    model, tokenizer = load(args.model, quantize=quantize_option(args), **load_options(args))
    require_language_model(model, args.model, args.command)
    if sampling is not None:
        load_draft(sampling, model, tokenizer)
    return model, tokenizer, model_prompt_style(args.model, args.prompt_style)


def add_prompt_style_argument(p) -> None:
    from gptlab.prompts import PROMPT_STYLES

    p.add_argument("--prompt-style", default=None, choices=list(PROMPT_STYLES),
                   help="default: the style the model was fine-tuned with, else alpaca")


def add_respond(sub) -> None:
    p = sub.add_parser("respond", help="answer every instruction of a file with a model, for `gptlab judge`",
                       description="Write each record of --input with the model's answer added (key --key).")
    p.add_argument("--model", required=True, help="fine-tuned run directory (or other model source)")
    p.add_argument("--input", default=None, help="JSON/JSONL records (default: MODEL/test.json from finetune-instruct)")
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--key", default="model_response", help="key of the answer in each record (default: %(default)s)")
    add_prompt_style_argument(p)
    p.add_argument("--limit", type=int, default=None, help="answer only the first N records")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sampling_arguments(p, SamplingConfig(max_new_tokens=256))
    add_quantize_arguments(p)
    p.set_defaults(run=run_respond)


def run_respond(args) -> None:
    import json
    from pathlib import Path

    from gptlab.files import atomic_write_text
    from gptlab.instruction_data import TEST_FILE, load_instruction_records
    from gptlab.respond import respond
    from gptlab.run import check_output_path

    sampling = sampling_kwargs(args)
    if args.limit is not None and args.limit <= 0:
        raise GptlabError(f"--limit must be a positive number of records, got {args.limit}")
    source = args.input or Path(args.model) / TEST_FILE
    if args.input is None and not Path(source).is_file():
        raise GptlabError(f"no --input given and {source} does not exist; pass --input FILE")
    check_output_path(args.output, [source])  # before generating every answer
    records = load_instruction_records(source)[:args.limit]
    model, tokenizer, style = _load_instruct_model(args, sampling)
    answered = respond(model, tokenizer, style, records, key=args.key, progress=not args.quiet, **sampling)
    atomic_write_text(args.output, json.dumps(answered, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.output}: {len(answered)} records answered in the {style.name} style\n"
          f"next: gptlab judge --input {args.output}   (or --offline for ROUGE-L and exact match only)")


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk to an instruction-tuned model, streaming",
                       description="Interactive multi-turn chat in the model's prompt style; old turns are dropped "
                                   "when the conversation outgrows the context. /reset, /exit; Ctrl-C stops an answer.")
    p.add_argument("--model", required=True, help="fine-tuned run directory (or other model source)")
    add_prompt_style_argument(p)
    p.add_argument("--system", default=None, help="system text that replaces the style's preamble")
    add_sampling_arguments(p, SamplingConfig(max_new_tokens=256))
    add_quantize_arguments(p)
    p.set_defaults(run=run_chat)


def run_chat(args) -> None:
    from gptlab.chat import chat

    sampling = sampling_kwargs(args)
    model, tokenizer, style = _load_instruct_model(args, sampling)
    chat(model, tokenizer, style, system=args.system, **sampling)


def add_judge(sub) -> None:
    p = sub.add_parser("judge", help="score model answers 0-100 with an LLM judge, plus ROUGE-L and exact match",
                       description="Score each record's answer (--key) against its reference 'output' with an LLM "
                                   "over an OpenAI-compatible chat-completions API (Ollama, OpenAI, gptlab serve). "
                                   "Scores are cached beside the output, so an interrupted run resumes.")
    p.add_argument("--input", required=True, help="records with answers, from `gptlab respond`")
    p.add_argument("--output", default=None, help="scored records (default: INPUT.judged.json; histogram .png beside it)")
    p.add_argument("--key", default="model_response", help="key of the answer in each record (default: %(default)s)")
    p.add_argument("--offline", action="store_true", help="no judge: ROUGE-L and exact match only")
    p.add_argument("--base-url", default=os.environ.get("GPTLAB_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
                   or JUDGE_BASE_URL,
                   help="chat-completions endpoint (env GPTLAB_JUDGE_BASE_URL or OPENAI_BASE_URL; default: %(default)s, Ollama)")
    p.add_argument("--judge-model", default=os.environ.get("GPTLAB_JUDGE_MODEL") or JUDGE_MODEL,
                   help="judge model name (env GPTLAB_JUDGE_MODEL; default: %(default)s)")
    p.add_argument("--api-key", default=None, help="API key (better: env GPTLAB_JUDGE_API_KEY or OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each reply (default: %(default)s)")
    p.add_argument("--retries", type=int, default=3, help="retries of a timed-out or failed request (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=JUDGE_MAX_TOKENS,
                   help="longest reply asked of the judge, in tokens; the score is one number, so this only stops a "
                        "judge that rambles (raise it for one that reasons before it answers; default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_judge)


def run_judge(args) -> None:
    from gptlab.evaluate import JudgeClient, evaluate_responses, judge_output_paths
    from gptlab.run import check_output_path

    client = None
    if not args.offline:
        key = args.api_key or os.environ.get("GPTLAB_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        client = JudgeClient(args.base_url, args.judge_model, key, timeout=args.timeout, retries=args.retries,
                             max_tokens=args.max_tokens)
    for option, path in judge_output_paths(args.input, args.output, judged=client is not None).items():
        check_output_path(path, [args.input], option)  # never onto the input or a run's own files
    s = evaluate_responses(args.input, args.output, args.key, client, progress=not args.quiet)
    print(f"{s['n']} records: ROUGE-L {s['rouge_l']:.4f}, exact match {s['exact_match']:.2%}")
    if client is not None:
        mean = f"{s['judge_mean']:.2f}/100" if s["judge_mean"] is not None else "n/a"
        print(f"judge {s['judge_model']} at {s['judge_url']}: mean score {mean} over {s['judged']} records"
              + (f" ({s['unscored']} unscored; run again to retry them)" if s["unscored"] else ""))
        print(s["text_histogram"])
    print(f"wrote {s['output']}" + (f" and {s.get('plot')}" if s.get("plot") else ""))


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP: OpenAI-compatible API and a chat page",
                       description="Serve SOURCE at http://HOST:PORT/ (a chat page) and /v1 (OpenAI's completions, "
                                   "chat completions and models API, streaming; /v1/classify for a classifier run). "
                                   "Needs the serve extra: pip install 'gptlab[serve]'.")
    p.add_argument("--model", required=True, help="run directory (or other model source)")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but the chat page and /health, "
                        f"checked before a request's body is read (default: ${API_KEY_ENV} if set)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the run directory's name)")
    p.add_argument("--prompt-style", default=None, help="chat prompt style (default: the run's, else alpaca)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                   help="also answer requests naming HOST in their Host header (repeatable; '*': any). Requests "
                        "that reach a loopback address must name localhost, 127.0.0.1 or [::1] otherwise, so a "
                        "web page cannot reach the server by DNS rebinding")
    add_device_argument(p)
    from gptlab.config import default_serve_threads

    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help=f"torch threads for the model (default: half the cores, at least 1: "
                        f"{default_serve_threads()} here; torch's own default, every core, serves less under load)")
    add_options(p.add_argument_group("limits"), ServeLimits)
    add_quantize_arguments(p)
    p.set_defaults(run=run_serve)


def run_serve(args) -> None:
    from gptlab.config import default_serve_threads

    limits = ServeLimits.from_options(**given(args, ServeLimits))
    threads = default_serve_threads() if args.threads is None else args.threads
    if threads < 1:
        raise GptlabError(f"--threads must be at least 1, got {threads}")
    try:
        from gptlab.serve import serve
    except ImportError as e:
        raise GptlabError(f"serving needs FastAPI and uvicorn ({e}); pip install 'gptlab[serve]'") from None
    import torch

    torch.set_num_threads(threads)  # process-wide, so the command sets it, not the library
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
          limits=limits, device=args.device, name=args.model_name, prompt_style=args.prompt_style,
          allowed_hosts=tuple(args.allowed_host), quantize=quantize_option(args), dtype=args.dtype)


# ---- preference tuning (DPO) -------------------------------------------------------------------

def add_finetune_dpo(sub) -> None:
    p = sub.add_parser("finetune-dpo", help="align an instruction-tuned model with preference pairs (DPO)",
                       description="Direct preference optimisation: --init (a finetune-instruct run) learns to prefer "
                                   "each record's 'chosen' answer over its 'rejected' one, relative to its own "
                                   "frozen starting point. Writes an ordinary run directory (chat, respond, serve "
                                   "and export read it) with the DPO loss, rewards, reward margin and reward "
                                   "accuracy in metrics.csv, plotted in loss.png, rewards.png and "
                                   "reward_accuracy.png.")
    add_options(p, DPOSettings)
    p.add_argument("--out", required=True, help="run directory to write")
    add_train_arguments(p, DPO_TRAINING, shown={"lr": f"{DPO_TRAINING.lr}, {LORA_LR['dpo']} with --lora"})
    p.set_defaults(run=run_finetune_dpo)


def run_finetune_dpo(args) -> int:
    from gptlab.finetune.dpo import finetune_dpo, format_dpo_summary
    from gptlab.run import read_run_config

    options = given(args, DPOSettings)
    result = finetune_dpo(options.pop("data", None), args.out, train_config=train_options(args),
                          resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, **options)
    last = next((r for r in reversed(result.history) if r.get("val_loss") not in (None, "")), {})
    summary = format_dpo_summary(read_run_config(args.out).get("initial"), last)
    print(f"{'stopped' if result.interrupted else 'done'}: step {result.step}, train loss {result.train_loss:.3f}"
          + (f"; {summary}" if summary else "") + f"; run saved in {args.out}"
          + (" (continue with --resume)" if result.interrupted else f"\nnext: gptlab chat --model {args.out}"))
    return stopped_status(result)


# ---- classification fine-tuning and classify ----------------------------------------------------

def add_finetune_classifier(sub) -> None:
    scratch, pretrained = classifier_training(None), classifier_training("gpt2")
    shown = {name: f"{getattr(scratch, name)} from scratch, {getattr(pretrained, name)} with --init"
             for name in ("epochs", "lr", "batch_size")}
    shown["lr"] += f", {LORA_LR['classifier']} with --lora"
    shown["eval_interval"] = "once per epoch"
    p = sub.add_parser("finetune-classifier", help="fine-tune a GPT to label texts (spam or ham, ...)",
                       description="Replace the output head with a NUM_CLASSES-wide one and train on a file of "
                                   "labelled texts (CSV/TSV/JSONL, or the SMS Spam Collection's label<TAB>text). "
                                   "Writes a run directory with metrics.csv, loss.png, accuracy.png, "
                                   "evaluation.json and confusion_matrix.png that `gptlab classify` reads.")
    add_options(p, ClassifierSettings)
    p.add_argument("--out", required=True, help="run directory to write")
    add_train_arguments(p, scratch, shown=shown)
    p.set_defaults(run=run_finetune_classifier)


def run_finetune_classifier(args) -> int:
    from gptlab.finetune.classifier import finetune_classifier

    options = given(args, ClassifierSettings)
    result = finetune_classifier(
        options.pop("data", None), args.out, train_config=train_options(args), resume=args.resume,
        overwrite=args.overwrite, progress=not args.quiet, **options)
    if result.train.interrupted:
        print(f"stopped at step {result.train.step}; run saved in {args.out} (continue with --resume)")
        return stopped_status(result.train)
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
    add_device_argument(p)
    add_quantize_arguments(p)
    p.set_defaults(run=run_classify)


def run_classify(args) -> None:
    from gptlab.classify import Classifier, classify_file
    from gptlab.run import check_output_path

    if bool(args.texts) == bool(args.input):
        raise GptlabError("give either TEXT arguments or --input FILE (one of them)")
    if args.output and not args.input:
        raise GptlabError("--output needs --input")
    if args.batch_size <= 0:
        raise GptlabError(f"batch-size must be positive, got {args.batch_size}")
    if args.output:
        check_output_path(args.output, [args.input])  # before classifying every text
    classifier = Classifier.load(args.model, quantize=quantize_option(args), **load_options(args))
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


def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="write a model with int8 or int4 weights, as a run directory",
                       description="Write SOURCE (anything --model takes; a LoRA run's adapters are merged in) to "
                                   "OUT_DIR as a gptlab run whose model.safetensors holds every linear layer's weights "
                                   "as integers and their scales: int8 symmetric per output channel, or int4 in "
                                   "groups of --group-size inputs with a scale and zero point each, two per byte. "
                                   "generate, chat, respond, classify and serve load it as any run.")
    p.add_argument("source", help="model to quantize (a float model; a quantized run is refused)")
    p.add_argument("--to", required=True, choices=QUANTIZE_KINDS, help="int8 or int4")
    add_group_size_argument(p)
    p.add_argument("--out", required=True, help="run directory to write (a new or empty folder)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    p.set_defaults(run=run_quantize)


def run_quantize(args) -> None:
    from gptlab.weights import quantize_run

    print(quantize_run(args.source, args.out, quantize_option(args, args.to), overwrite=args.overwrite))


COMMANDS = [add_prepare, add_pretrain, add_generate, add_export, add_train_tokenizer,
            add_finetune_instruct, add_finetune_dpo, add_respond, add_chat, add_judge, add_serve,
            add_finetune_classifier, add_classify, add_quantize]


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


def prepare_process(command: str) -> None:
    """Process-wide settings that only the command may make (a library call never does): see
    ``gptlab.device.keep_freed_memory_mapped``, which the training commands apply."""
    if command in TRAINING_COMMANDS:
        from gptlab.device import keep_freed_memory_mapped

        keep_freed_memory_mapped()


def join_ranks(args: argparse.Namespace) -> None:
    """Under torchrun, a training command joins the other ranks (``gptlab.distributed.setup``); ranks other
    than 0 then print nothing but their own errors and warnings."""
    if args.command not in TRAINING_COMMANDS or not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return
    from gptlab import distributed

    distributed.setup(getattr(args, "device", "auto"))
    if not distributed.is_main():
        logging.getLogger("gptlab").setLevel(logging.WARNING)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


def _ranks_joined() -> bool:
    module = sys.modules.get("gptlab.distributed")  # imported only by a command that joined (or trains)
    return module is not None and module.active()


def _rank_prefix() -> str:
    return f"rank {os.environ['RANK']}: " if _ranks_joined() and os.environ["RANK"] != "0" else ""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that half-written files are removed on the way out."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("gptlab").setLevel(logging.INFO)
    previous_sigterm = None
    # The server handles signals itself, and chat takes Ctrl-C to stop an answer: SIGTERM keeps its default there
    # (the process ends; the shell reports 143), as nothing is being written.
    if args.command not in ("serve", "chat") and threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        prepare_process(args.command)
        join_ranks(args)
        return args.run(args) or 0
    except GptlabError as e:
        print(f"gptlab {args.command}: error: {_rank_prefix()}{e}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError) as e:  # mkdir met a file where a directory has to go
        print(f"gptlab {args.command}: error: {e.filename}: a file stands where a directory has to be created; "
              f"choose another output path", file=sys.stderr)
        return 2
    except OSError as e:  # permission denied, disk full, ...: the system's own words, on one line
        print(f"gptlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: 130; SIGTERM: 143, as the shell reports a process a signal ended
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"\n{signal.Signals(signum).name}: stopped", file=sys.stderr)
        return 128 + signum
    except RuntimeError as e:
        if not (_ranks_joined() and sys.modules["gptlab.distributed"].lost_peers(e)):
            raise
        # a collective that timed out or lost its peer: another rank failed (its own error says why) or hangs
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"gptlab {args.command}: error: {_rank_prefix()}the ranks lost each other ({first}); see the first "
              f"rank's error above", file=sys.stderr)
        return 1
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if _ranks_joined():
            from gptlab.distributed import teardown

            teardown()


if __name__ == "__main__":
    sys.exit(main())
