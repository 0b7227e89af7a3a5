"""The ``gptlab`` command: argument parsing only; every subcommand calls the library in a few lines.

A ``GptlabError`` (a mistake the user can fix) prints one line and exits with status 2.
To add a subcommand: write ``add_<name>(subparsers)`` that registers it with ``set_defaults(run=...)``
and list it in ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from gptlab.errors import GptlabError
from gptlab.train import TrainConfig

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
    g.add_argument("--eval-batches", type=int, default=defaults.eval_batches, help="validation batches per evaluation (default: all)")
    g.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    g.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    g.add_argument("--precision", default=defaults.precision, choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision; auto is bf16 on a capable GPU, else fp32 (default: %(default)s)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (faster on GPU after a warm-up)")
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
    add_train_arguments(p, TrainConfig(epochs=10, batch_size=8, lr=4e-4, eval_interval=20))
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
    from gptlab.train import select_device
    from gptlab.weights import load

    model, tokenizer = load(args.model, device=select_device(args.device))
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for piece in stream_text(model, tokenizer, args.prompt, **sampling_kwargs(args)):
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


COMMANDS = [add_prepare, add_pretrain, add_generate, add_export, add_train_tokenizer]


def build_parser() -> argparse.ArgumentParser:
    from gptlab import __version__

    parser = argparse.ArgumentParser(
        prog="gptlab",
        description="A from-scratch GPT toolkit: tokenize, pretrain, fine-tune, generate, serve.",
        epilog="Run `gptlab COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
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
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
