"""The run directory: the one on-disk layout every training stage writes and every using stage reads.

    RUN/
      config.json        model config, tokenizer reference, stage metadata (labels, prompt style, ...)
      model.safetensors  the latest weights (a tied output head is stored once, as ``wte.weight``)
      tokenizer/         only for tokenizers that are not built in (``config.json`` then says "tokenizer")
      train_state.pt     weights + optimizer + schedule + RNG + data position, for exact ``--resume``
      metrics.csv        one row per evaluation: step, tokens_seen, train_loss, val_loss, ...
      loss.png           train and validation loss against tokens seen

Every file is written to a temporary name and renamed into place, so a kill mid-write leaves the
previous version intact, never a half-written file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptlab.errors import GptlabError
from gptlab.files import atomic_write, atomic_write_text
from gptlab.model import GPTConfig, GPTModel
from gptlab.surgery import rebuild_head
from gptlab.tokenizer import Tokenizer, get_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.csv"
PLOT_FILE = "loss.png"
TOKENIZER_DIR = "tokenizer"
BUILTIN_TOKENIZERS = ("gpt2",)
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE, METRICS_FILE, PLOT_FILE)  # what --overwrite removes


def model_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """The weights to store: contiguous tensors, a tied head left out (safetensors refuses shared storage)."""
    state = model.state_dict()
    if model.lm_head.weight is model.wte.weight:
        state.pop("lm_head.weight")
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_model(
    run_dir: str | Path, model: GPTModel, tokenizer: Tokenizer, meta: dict | None = None
) -> None:
    """Write ``config.json`` and ``model.safetensors`` (and the tokenizer if it is not built in)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_ref = tokenizer.name
    if tokenizer.name not in BUILTIN_TOKENIZERS:
        tokenizer.save(run_dir / TOKENIZER_DIR)
        tokenizer_ref = TOKENIZER_DIR
    config = {"model": model.config.to_dict(), "tokenizer": tokenizer_ref, **(meta or {})}
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    state = {k: v.cpu() for k, v in model_state_dict(model).items()}
    atomic_write(run_dir / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise GptlabError(f"{run_dir}: not a gptlab run directory (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        GPTConfig.from_dict(config["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise GptlabError(f"{path}: unreadable run config ({e}); re-create it or train again") from None
    return config


def source_metadata(source: str | Path) -> dict:
    """A run directory's config.json; empty for any other source (a Hugging Face folder has no gptlab metadata)."""
    if not (Path(source) / CONFIG_FILE).is_file():
        return {}
    try:
        return read_run_config(source)
    except GptlabError:
        return {}


def load_model_weights(
    model: GPTModel, state: dict[str, torch.Tensor], source: str | Path, assign: bool = False
) -> None:
    """Copy ``state`` into ``model``, with an error that names the mismatch instead of PyTorch's wall of keys.

    ``assign=True`` makes ``state``'s tensors the parameters instead of copying them: for a model built
    on the meta device, so that loading holds one copy of the weights, not two.
    """
    expected = model_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            details.append(f"{k} has shape {tuple(state[k].shape)}, config needs {tuple(expected[k].shape)}")
        raise GptlabError(f"{source}: weights do not match the config ({'; '.join(details)})")
    tied = model.lm_head.weight is model.wte.weight
    model.load_state_dict(state, strict=False, assign=assign)  # strict=False only for the tied head, checked above
    if assign and tied:
        model.lm_head.weight = model.wte.weight  # assigning replaced wte's Parameter; tie the head to the new one


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GPTModel, Tokenizer, dict]:
    """Rebuild the model and tokenizer a stage saved; returns ``(model, tokenizer, config_json)``."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise GptlabError(f"{run_dir}: no {WEIGHTS_FILE}; the run was never checkpointed (train it, or --resume)")
    try:
        state = load_file(weights, device=str(device))
    except (SafetensorError, OSError) as e:
        raise GptlabError(f"{weights}: corrupt weights file ({e})") from None
    with torch.device("meta"):  # no random init to overwrite: the loaded tensors become the parameters
        model = rebuild_head(GPTModel(GPTConfig.from_dict(config["model"])), config)
    load_model_weights(model, state, weights, assign=True)
    tokenizer = get_tokenizer(config["tokenizer"], base_dir=run_dir)
    return model.eval(), tokenizer, config


def prepare_out_dir(out: str | Path, resume: bool, overwrite: bool) -> Path:
    """Refuse to train over an existing run unless asked to resume it or start it over.

    Creates nothing: the first checkpoint makes the directory, so a run that fails on its input (a
    missing file, bad data) leaves no empty directory behind.
    """
    out = Path(out)
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())  # what the checkpoint will build on
    if not existing.is_dir():
        raise GptlabError(f"{existing} is a file, not a directory; choose another --out than {out}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GptlabError(f"{existing}: no permission to write there; choose another --out than {out}")
    exists = (out / CONFIG_FILE).exists() or (out / STATE_FILE).exists()
    if resume and not (out / STATE_FILE).exists():
        raise GptlabError(f"{out}: nothing to resume (no {STATE_FILE}); start without --resume")
    if exists and not (resume or overwrite):
        raise GptlabError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    if overwrite and not resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    return out
