"""The run directory: the one on-disk layout every training stage writes and every using stage reads.

    RUN/
      config.json        model config, tokenizer reference, the stage's settings and training config,
                         the data's fingerprint, stage metadata (labels, prompt style, ...)
      model.safetensors  the latest weights (a tied output head is stored once, as ``wte.weight``)
      adapter.safetensors  instead, in a LoRA run: only what trained (the adapters, a classifier's head);
                         config.json's "base" names the frozen base and the fingerprint of its weights
      tokenizer/         only for tokenizers that are not built in (``config.json`` then says "tokenizer")
      train_state.pt     weights + optimizer + schedule + RNG + data position, for exact ``--resume``
      train_state.dcp/   beside it in an --fsdp run: the weights and optimizer, sharded, written by every rank
      metrics.csv        one row per evaluation: step, tokens_seen, train_loss, val_loss, ...
      loss.png           train and validation loss against tokens seen
      (stage outputs)    test.json, val.json (instruct); evaluation.json, accuracy.png, confusion_matrix.png
                         (classifier)

A checkpoint is one set of files, all of one step (``write_run_files``): they are written into a fresh
hidden folder ``RUN/.checkpoint-*.tmp``, which is then renamed to ``.checkpoint-*.ready`` (one atomic
rename: the commit), and only then moved into place file by file. Every reader asks ``run_file`` where
a file is, which prefers a committed folder still being moved, so a process killed at any moment
leaves either the previous set or the new one, never a mixture; the next start of the run finishes
the move (``recover_run_dir``) and removes what a killed writer left behind. A power cut is not
covered: nothing is fsync'ed.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptlab.config import TrainConfig, settings_from
from gptlab.errors import GptlabError
from gptlab.files import (
    check_output_file, check_writable_dir, fingerprint, remove_stale_temps, same_path, write_failure,
)
from gptlab.instruction_data import TEST_FILE, VAL_FILE
from gptlab.model import GPTConfig, GPTModel
from gptlab.surgery import trained_names
from gptlab.tokenizer import Tokenizer

log = logging.getLogger("gptlab")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"  # a LoRA run's weights: what trained, not the base
STATE_FILE = "train_state.pt"
SHARDED_STATE_DIR = "train_state.dcp"  # an --fsdp run's weights and optimizer, sharded (torch.distributed.checkpoint)
METRICS_FILE = "metrics.csv"
PLOT_FILE = "loss.png"
TOKENIZER_DIR = "tokenizer"
BUILTIN_TOKENIZERS = ("gpt2",)
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, ADAPTER_FILE, STATE_FILE, METRICS_FILE, PLOT_FILE)  # what --overwrite removes
# What the stages write beside the checkpoint (the classifier's evaluation, instruct's held-out records).
EVALUATION_FILE = "evaluation.json"
ACCURACY_PLOT = "accuracy.png"
CONFUSION_PLOT = "confusion_matrix.png"
REFERENCE_LOGPS_FILE = "reference_logps.json"  # DPO's frozen reference, scored once
REWARDS_PLOT = "rewards.png"
REWARD_ACCURACY_PLOT = "reward_accuracy.png"
STAGE_FILES = (EVALUATION_FILE, ACCURACY_PLOT, CONFUSION_PLOT, TEST_FILE, VAL_FILE, REFERENCE_LOGPS_FILE,
               REWARDS_PLOT, REWARD_ACCURACY_PLOT)
CHECKPOINT_PREFIX = ".checkpoint-"  # RUN/.checkpoint-STEP.XXXX.tmp while written, .ready once committed

T = TypeVar("T")
Writer = Callable[[Path], None]


def model_state_dict(model: GPTModel, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights to store: contiguous tensors, a tied head left out (safetensors refuses shared storage).

    Of a model with LoRA adapters only what trains: the adapters and a classifier's head (``trained_names``).
    ``state``: the model's full state gathered elsewhere (from FSDP's shards), else ``model.state_dict()``.
    """
    state = model.state_dict() if state is None else state
    if getattr(model, "lora", None) is not None:
        state = {k: state[k] for k in trained_names(model)}
    elif model.lm_head.weight is model.wte.weight:
        state.pop("lm_head.weight", None)  # (FSDP's gathered state may hold it once already)
    return {k: v.detach().contiguous() for k, v in state.items()}


def model_files(model: GPTModel, tokenizer: Tokenizer, meta: dict | None = None,
                step: int | None = None, state: dict[str, torch.Tensor] | None = None) -> dict[str, Writer]:
    """The writers of ``config.json``, ``model.safetensors`` (and the tokenizer if it is not built in);
    ``state`` as in ``model_state_dict``."""
    tokenizer_ref = tokenizer.name
    files: dict[str, Writer] = {}
    if tokenizer.name not in BUILTIN_TOKENIZERS:
        files[TOKENIZER_DIR] = tokenizer.save
        tokenizer_ref = TOKENIZER_DIR
    lora = getattr(model, "lora", None)
    adapter = {"lora": lora.to_dict(), "base": model.base_ref} if lora is not None else {}
    quantization = getattr(model, "quantization", None)  # gptlab.quantize: integer weights and their scales
    adapter.update({"quantization": quantization.to_dict()} if quantization is not None else {})
    text = json.dumps({"model": model.config.to_dict(), "tokenizer": tokenizer_ref, **(meta or {}), **adapter},
                      indent=2) + "\n"
    files[CONFIG_FILE] = lambda path: path.write_text(text, encoding="utf-8")
    state = {k: v.cpu() for k, v in model_state_dict(model, state).items()}
    metadata = {"format": "pt", **({"step": str(step)} if step is not None else {})}
    files[ADAPTER_FILE if lora is not None else WEIGHTS_FILE] = lambda path: save_file(state, path, metadata=metadata)
    return files


def save_model(
    run_dir: str | Path, model: GPTModel, tokenizer: Tokenizer, meta: dict | None = None
) -> None:
    """Write ``config.json`` and ``model.safetensors`` (and the tokenizer if it is not built in), as one set."""
    write_run_files(run_dir, model_files(model, tokenizer, meta))


# ---- checkpoints: one set of files, committed by one rename ----------------------------------------

def write_run_files(run_dir: str | Path, files: Mapping[str, Writer]) -> None:
    """Write ``files`` (name -> ``writer(path)``; a writer may make a folder) into ``run_dir`` as one set.

    A reader that asks ``run_file`` sees all of the new files or none of them, whenever this process dies.
    A write that fails (a full disk, no permission) is a ``GptlabError`` naming the file; the previous set
    is left as it was.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _finish_committed(run_dir)  # a set that a killed writer committed goes in before a newer one
    staging = Path(tempfile.mkdtemp(prefix=CHECKPOINT_PREFIX, suffix=".tmp", dir=run_dir))
    try:
        os.chmod(staging, 0o777 & ~_umask())
        for name, write in files.items():
            try:
                write(staging / name)
            except BaseException as e:
                reason = write_failure(e, staging)
                if reason is None:
                    raise
                raise GptlabError(f"{run_dir / name}: cannot write it ({reason})") from None
        _follow_umask(staging)
        ready = staging.with_suffix(".ready")
        os.replace(staging, ready)  # the commit: from here on every reader takes the new set
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_into_place(ready, run_dir)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _follow_umask(folder: Path) -> None:
    """The modes an ordinary open() or mkdir() would give (safetensors' writer makes its files 0600)."""
    mask = _umask()
    for item in folder.rglob("*"):
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def _committed(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob(CHECKPOINT_PREFIX + "*.ready"), key=lambda p: p.stat().st_mtime_ns)


def _move_into_place(ready: Path, run_dir: Path) -> None:
    for item in sorted(ready.iterdir()):
        target = run_dir / item.name
        if item.is_dir() and target.is_dir():  # a folder (the tokenizer) cannot be renamed over another
            shutil.rmtree(target)  # readers still find the new one in `ready` meanwhile
        os.replace(item, target)
    ready.rmdir()


def _finish_committed(run_dir: Path) -> None:
    for ready in _committed(run_dir):
        _move_into_place(ready, run_dir)


def run_file(run_dir: str | Path, name: str) -> Path:
    """Where the run's file ``name`` is: in a committed checkpoint still being moved into place, else ``run_dir``."""
    run_dir = Path(run_dir)
    for ready in reversed(_committed(run_dir)):
        if (ready / name).exists():
            return ready / name
    return run_dir / name


def read_run_file(run_dir: str | Path, name: str, read: Callable[[Path], T]) -> T:
    """``read(path)`` of the run's file ``name``; read again in place if the writer moved it meanwhile."""
    run_dir = Path(run_dir)
    while True:
        path = run_file(run_dir, name)
        try:
            return read(path)
        except Exception:
            if path.parent != run_dir and not path.exists():
                continue  # it was moved into place while being read
            raise


def recover_run_dir(run_dir: str | Path) -> None:
    """At the start of a run: finish a checkpoint that a killed writer committed, and delete what it left
    unfinished (an uncommitted checkpoint folder, temporary files of gptlab's and of safetensors')."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    _finish_committed(run_dir)
    count, size = remove_stale_temps(run_dir)
    for staging in run_dir.glob(CHECKPOINT_PREFIX + "*.tmp"):
        if staging.is_dir():
            size += sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
            count += 1
            shutil.rmtree(staging, ignore_errors=True)
    if count:
        log.info("%s: removed %d temporary file(s) or folder(s), %.1f MB, left by a killed run", run_dir, count,
                 size / 1e6)


def holds_run(run_dir: str | Path) -> bool:
    """Does ``run_dir`` hold a run (or the committed first checkpoint of one)?"""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    return (run_dir / CONFIG_FILE).exists() or (run_dir / STATE_FILE).exists() or bool(_committed(run_dir))


def clear_run(run_dir: str | Path) -> None:
    """``--overwrite``: remove the previous run's files, once the new run has started (so a new run that fails
    to start leaves the old one as it was). Files gptlab did not write stay."""
    run_dir = Path(run_dir)
    if not holds_run(run_dir):
        return
    recover_run_dir(run_dir)
    saved_tokenizer = _stored_tokenizer_ref(run_dir) == TOKENIZER_DIR
    for name in (*RUN_FILES, *STAGE_FILES):
        (run_dir / name).unlink(missing_ok=True)
    if saved_tokenizer and (run_dir / TOKENIZER_DIR).is_dir():
        shutil.rmtree(run_dir / TOKENIZER_DIR)
    shutil.rmtree(run_dir / SHARDED_STATE_DIR, ignore_errors=True)


def _stored_tokenizer_ref(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8")).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        return None


def read_run_config(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise GptlabError(f"{run_dir} is a file, not a gptlab run directory")
    path = run_file(run_dir, CONFIG_FILE)
    if not path.is_file():
        raise GptlabError(f"{run_dir}: not a gptlab run directory (no {CONFIG_FILE})")
    try:
        config = read_run_file(run_dir, CONFIG_FILE, lambda p: json.loads(p.read_text(encoding="utf-8")))
        GPTConfig.from_dict(config["model"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise GptlabError(f"{run_dir / CONFIG_FILE}: unreadable run config ({e}); re-create it or train again") from None
    return config


def load_torch_file(path: str | Path, fix: str) -> Any:
    """``torch.load`` of tensors and plain containers only: pickled code is refused, never run.

    A damaged or foreign file is a ``GptlabError`` naming it, followed by ``fix``; never torch's advice to
    load it with ``weights_only=False`` (which would run whatever the pickle holds).
    """
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on its way to refusing one
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(str(e))
        raise GptlabError(f"{path}: refused ({reason}); gptlab reads only tensors from it, never pickled "
                          f"objects (they could run code); {fix}") from None
    except Exception as e:  # a truncated zip, an empty file, ...
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise GptlabError(f"{path}: unreadable, damaged or truncated ({first}); {fix}") from None


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


def _unpickling_reason(message: str) -> str:
    """torch's reason for refusing a pickle, without its advice (weights_only=False, add_safe_globals): following
    that advice would run whatever the file holds."""
    for line in message.splitlines()[1:]:  # the first line is the advice
        line = line.split("WeightsUnpickler error:")[-1].split(" Please use")[0].strip().rstrip(".")
        if line and not any(word in line for word in ("weights_only", "safe_globals", "Please", "documentation")):
            return line[:160]
    return "not a PyTorch file of tensors"


def read_run_weights(run_dir: str | Path, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a run's ``model.safetensors`` or ``adapter.safetensors`` (``gptlab.weights.load_run``
    builds the model around them)."""
    run_dir = Path(run_dir)
    path = run_file(run_dir, name)
    if not path.is_file():
        raise GptlabError(f"{run_dir}: no {name}; the run was never checkpointed (train it, or --resume)")
    try:
        return read_run_file(run_dir, name, lambda p: load_file(p, device=str(device)))
    except (SafetensorError, OSError) as e:
        raise GptlabError(f"{run_dir / name}: corrupt weights file ({e})") from None


def prepare_out_dir(out: str | Path, resume: bool, overwrite: bool) -> Path:
    """Refuse to train over an existing run unless asked to resume it or start it over; refuse an --out that
    cannot be written. Creates and removes nothing: the first checkpoint makes the directory (so a run that
    fails on its input leaves no empty directory behind), and ``--overwrite`` clears the old run only once
    the new one has started (``clear_run``).
    """
    out = Path(out)
    if resume and overwrite:
        raise GptlabError("give --resume (continue the run) or --overwrite (start it over), not both")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())  # what the checkpoint will build on
    if not existing.is_dir():
        raise GptlabError(f"{existing} is a file, not a directory; choose another --out than {out}")
    check_writable_dir(out, "--out")
    if resume and not run_file(out, STATE_FILE).exists():
        raise GptlabError(f"{out}: nothing to resume (no {STATE_FILE}); start without --resume")
    if holds_run(out) and not (resume or overwrite):
        raise GptlabError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    return out


def check_output_path(path: str | Path, inputs=(), option: str = "--output") -> Path:
    """``gptlab.files.check_output_file``, and never a file of a run directory (its held-out test.json, its
    weights, ...): ``respond``, ``classify`` and ``judge`` write only new files there."""
    path = Path(path)
    for source in inputs:  # the input first: writing onto it is the likelier mistake
        if source is not None and same_path(path, source):
            raise GptlabError(f"{option} {path} is also the input; write the output to another file")
    if holds_run(path.parent) and path.name in (*RUN_FILES, *STAGE_FILES, TOKENIZER_DIR):
        raise GptlabError(f"{option} {path} is a file of the run {path.parent}; write to another name, "
                          f"e.g. {path.parent / 'responses.json'}")
    return check_output_file(path, inputs, option)


# ---- starting a stage: the given settings, or on --resume the run's own ------------------------------

# What a resumed run may change: where it runs, and how far it trains. A larger --max-steps or --epochs
# trains on past the planned end; the learning-rate schedule stays the one the run started with, so the
# extra steps run at its final rate (lr x min-lr-ratio), and the steps done so far are exactly as before.
RESUME_MAY_CHANGE = ("max_steps", "epochs", "device")


@dataclass
class StageStart:
    """A training stage's settings and training config, and what it stores so that a resume can replay them."""

    settings: Any
    train_config: TrainConfig
    previous: dict  # the run's config.json on resume; {} for a new run
    data_fingerprint: dict | None


def start_stage(command: str, stage: str, settings_cls: type, out: str | Path, options: Mapping[str, Any],
                train_config: TrainConfig | Mapping[str, Any] | None,
                default_training: Callable[[Any], TrainConfig], resume: bool, *,
                normalize: Callable[[Any], Any] = lambda settings: settings,
                data_path: Callable[[Any], str | Path | None] = lambda settings: settings.data) -> StageStart:
    """The settings a stage runs with: from ``options`` for a new run; on ``resume`` the run's stored ones.

    ``options`` are the settings the caller gave (the command line passes only what the user typed);
    ``train_config`` is a ``TrainConfig``, or a mapping of the fields that change ``default_training``'s
    (or, on resume, the run's). On resume, any given value that differs from the run's is refused with
    one line naming each (except ``RESUME_MAY_CHANGE``), and the data must have the fingerprint stored at
    the run's start (a moved file with the same contents is fine). ``normalize`` resolves "auto" settings
    the way the stage stores them; ``data_path`` is the file the settings read.
    """
    if not resume:
        settings = normalize(settings_from(settings_cls, dict(options), command))
        config = _training(train_config, default_training(settings), command)
        path = data_path(settings)
        return StageStart(settings, config, {}, _fingerprint(path, "--data") if path is not None else None)

    if not run_file(out, STATE_FILE).exists():
        raise GptlabError(f"{out}: nothing to resume (no {STATE_FILE}); start without --resume")
    previous = read_run_config(out)
    if previous.get("stage") != stage:
        raise GptlabError(f"{out}: a {previous.get('stage') or 'non-training'} run, not one of {command}; "
                          "resume it with the command that made it")
    if not isinstance(previous.get(stage), dict) or not isinstance(previous.get("train"), dict):
        raise GptlabError(f"{out}: config.json lacks the run's settings (an older gptlab wrote it); it cannot be "
                          "resumed exactly: start a new run")
    stored = _stored_settings(settings_cls, previous[stage], command)
    settings = normalize(settings_from(settings_cls, {**asdict(stored), **options}, command))
    differences = [_difference(settings_cls, name, getattr(settings, name), getattr(stored, name))
                   for name in options if name != "data" and getattr(settings, name) != getattr(stored, name)]

    stored_train = _training(_known(TrainConfig, previous["train"]), TrainConfig(), command)
    given_train = asdict(train_config) if isinstance(train_config, TrainConfig) else dict(train_config or {})
    if "epochs" in given_train and "max_steps" not in given_train:
        given_train["max_steps"] = None  # --epochs counts only without --max-steps, which the run may have had
    config = _training(given_train, stored_train, command)
    differences += [_difference(TrainConfig, name, getattr(config, name), getattr(stored_train, name))
                    for name in given_train
                    if name not in RESUME_MAY_CHANGE and getattr(config, name) != getattr(stored_train, name)]

    stored_fingerprint = previous.get("data_fingerprint")
    path = data_path(settings)
    if stored_fingerprint is not None and path is not None:
        now = _fingerprint(path, "--data")
        if now != {k: v for k, v in stored_fingerprint.items() if k != "path"}:
            was = stored_fingerprint.get("path", "the run's data")
            if "data" in options:
                differences.append(f"--data {path} (not the data the run trained on: {_describe_fp(now)}; "
                                   f"the run's {was}: {_describe_fp(stored_fingerprint)})")
            else:
                raise GptlabError(f"{path}: changed since the run started ({_describe_fp(now)}, then "
                                  f"{_describe_fp(stored_fingerprint)}); restore it, or start a new run")
    if differences:
        raise GptlabError(f"{out}: --resume continues the run with its own settings; these differ from them: "
                          f"{', '.join(differences)}. Leave them out, or start a new run (another --out, or "
                          "--overwrite)")
    return StageStart(settings, config, previous, stored_fingerprint)


def fingerprint_record(start: StageStart, path: str | Path | None) -> dict:
    """What config.json stores of the data: its fingerprint and where it was read."""
    if start.data_fingerprint is None or path is None:
        return {}
    return {"data_fingerprint": {**{k: v for k, v in start.data_fingerprint.items() if k != "path"},
                                 "path": str(path)}}


def _fingerprint(path: str | Path, option: str) -> dict:
    if not Path(path).exists():
        raise GptlabError(f"{option} {path}: no such file or folder")
    return fingerprint(path)


def _describe_fp(fp: dict) -> str:
    return f"{fp['bytes']:,} bytes in {fp['files']} file(s), sha256 {fp['sha256'][:12]}"


def _known(cls: type, values: Mapping[str, Any]) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def _stored_settings(cls: type, section: Mapping[str, Any], command: str):
    """The settings stored in a run's stage section. A stage may keep a derived value under a setting's name
    (the classifier's resolved ``max_length``); the setting as given is then under ``requested_<name>``."""
    values = {f.name: section.get(f"requested_{f.name}", section.get(f.name)) for f in fields(cls)
              if f.name in section or f"requested_{f.name}" in section}
    return settings_from(cls, values, command)


def _training(given: TrainConfig | Mapping[str, Any] | None, defaults: TrainConfig, command: str) -> TrainConfig:
    if given is None:
        return defaults
    if isinstance(given, TrainConfig):
        return given
    unknown = sorted(set(given) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise GptlabError(f"{command}: unknown training setting(s) {', '.join(unknown)}")
    return replace(defaults, **given)


def _difference(cls: type, name: str, value: Any, stored: Any) -> str:
    meta = next(f.metadata for f in fields(cls) if f.name == name)
    flag = meta.get("flag", "--" + name.replace("_", "-")) if "help" in meta else name
    return f"{flag} {_show(value)} (the run has {_show(stored)})"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return " ".join(map(_show, value))
    return "none" if value is None else str(value)
