"""Preference tuning with DPO (Rafailov et al. 2023; the LLMs-from-scratch book's chapter-7 bonus).

An instruction-tuned model (the policy) learns to prefer the ``chosen`` answer of each pair over the
``rejected`` one, relative to a frozen copy of where it started (the reference):

    loss = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))

where ``pi_c`` is the policy's log-probability of the chosen response (tokens of the response only, the
prompt masked; their mean or sum: ``logp_reduction``) and ``ref_*`` the reference's. The implicit reward of
a response is ``beta * (pi - ref)``; the loss is ``-log sigmoid(chosen reward - rejected reward)``.

The reference never changes, so its log-probabilities are computed once, up front, in eval mode, and
travel with the batches: no second copy of the weights is held, each training step runs one forward and
backward pass instead of two forwards and a backward, and evaluations score only the policy. They are
stored in the run directory (``reference_logps.json``), so ``--resume`` uses exactly the same values even
if the starting run has changed since.

The stage joins ``gptlab.preference_data`` (records, pairs, the collate), ``gptlab.train`` (the one loop:
checkpoints, exact resume, Ctrl-C saves) and ``gptlab.respond`` (a sample answer at each evaluation). The
result is an ordinary run directory with the prompt style in its config.json, for chat, respond and serve.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from gptlab import distributed
from gptlab.config import DPOSettings, TrainConfig, dpo_training
from gptlab.device import autocast, resolve_precision, select_device, to_device
from gptlab.errors import GptlabError
from gptlab.instruction_data import IGNORE_INDEX, TEST_FILE, VAL_FILE, split_records
from gptlab.model import GPTModel
from gptlab.preference_data import (
    PreferenceDataset, collate_preferences, default_preference_path, load_preference_records,
)
from gptlab.prompts import PromptStyle, get_prompt_style
from gptlab.respond import DEFAULT_STYLE, respond_one
from gptlab.run import (
    METRICS_FILE, REFERENCE_LOGPS_FILE, REWARD_ACCURACY_PLOT, REWARDS_PLOT, fingerprint_record, prepare_out_dir, read_run_file, source_metadata, start_stage,
)
from gptlab.tokenizer import Tokenizer
from gptlab.train import MetricsLog, TrainResult, train
from gptlab.weights import build_model, load_run

log = logging.getLogger("gptlab")

STAGE = "dpo"
# the frozen reference's log-probabilities (for an exact --resume) and the reward plots: run.STAGE_FILES
REFERENCE_FILE, REWARDS_PLOT, ACCURACY_PLOT = REFERENCE_LOGPS_FILE, REWARDS_PLOT, REWARD_ACCURACY_PLOT
PAIR_METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy")


def finetune_dpo(
    data: str | Path | None,
    out: str | Path,
    train_config: TrainConfig | dict | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> TrainResult:
    """Align ``init`` (an instruction-tuned run) with the preference pairs in ``data`` by DPO.

    ``data``: JSON/JSONL records of ``instruction``, ``input``, ``chosen``, ``rejected`` (None: the book's
    1,100, shipped with gptlab). ``options`` are the fields of ``gptlab.config.DPOSettings`` (``init``,
    ``prompt_style``, ``beta``, ``logp_reduction``, ...); ``train_config`` defaults to ``DPO_TRAINING`` (``dpo_training(lora)``), the
    book's recipe and what ``gptlab finetune-dpo`` uses (a dict changes some of its fields). On ``resume``
    the settings stored in the run are used; a given option that differs from them is an error
    (``gptlab.run.start_stage``). Writes the run directory ``out`` (weights, metrics.csv with the DPO loss, rewards, margin and
    reward accuracy of each evaluation, loss.png, rewards.png, reward_accuracy.png, resumable state) plus
    the held-out ``test.json`` and ``val.json``. ``TrainResult.val_loss`` is the last validation DPO loss.
    """
    given = {**options, **({"data": str(data)} if data is not None else {})}
    start = start_stage("finetune-dpo", STAGE, DPOSettings, out, given, train_config, lambda settings: dpo_training(settings.lora),
                        resume, data_path=lambda settings: settings.data or default_preference_path())
    settings, train_config, previous = start.settings, start.train_config, start.previous
    data = Path(settings.data) if settings.data is not None else default_preference_path()
    records = load_preference_records(data)
    train_records, test_records, val_records = split_records(records, settings.train_fraction, settings.test_fraction)
    out = prepare_out_dir(out, resume, overwrite)

    model, tokenizer, style = _policy_model(settings, out, previous, resume, train_config.seed)
    max_length = _max_length(settings, model)
    first_val = len(train_records) + len(test_records)  # the validation records' first number in the file
    train_set = PreferenceDataset(train_records, tokenizer, style, max_length, name=f"{data} (training part)")
    val_set = PreferenceDataset(val_records, tokenizer, style, max_length, name=f"{data} (validation part)",
                                start=first_val)
    stage_files = {name: json.dumps(part, indent=2, ensure_ascii=False) + "\n"  # written with each checkpoint
                   for name, part in ((TEST_FILE, test_records), (VAL_FILE, val_records))}
    log.info("%s: %d pairs -> %d train / %d test / %d validation; style %s; beta %g, %s log-probabilities; "
             "model %.1fM parameters", data, len(records), len(train_set), len(test_records), len(val_set),
             style.name, settings.beta, settings.logp_reduction, model.num_parameters() / 1e6)

    collate = partial(collate_preferences, pad_id=tokenizer.eot_id, max_length=max_length)
    device = select_device(train_config.device)
    dtype = resolve_precision(train_config.precision, device, model.num_parameters())  # the loop's autocast, so step 0 matches bit for bit
    stage_files[REFERENCE_FILE] = _attach_reference(model, (train_set, val_set), out, resume, settings, collate,
                                                    train_config.batch_size, device, dtype)

    loss = DPOLoss(settings.beta, settings.logp_reduction)
    columns = _evaluator(loss, train_set, val_set, collate, train_config, settings.train_eval_batches, device, dtype)
    initial = previous.get("initial")
    if not resume:
        initial = _in_eval_mode(model, columns)
        log.info("before DPO (policy = reference): %s", ", ".join(f"{k} {v:.4f}" for k, v in initial.items()))
    sample = _sampler(tokenizer, style, (val_records or test_records or train_records)[0])
    meta = {"stage": STAGE, "prompt_style": style.name, "data": str(data), "init": settings.init,
            "max_length": max_length, "initial": initial,
            "split": {"train": len(train_records), "test": len(test_records), "val": len(val_records)},
            STAGE: asdict(settings), **fingerprint_record(start, data)}
    # The validation DPO loss comes from ``columns`` (one pass scores loss, rewards and accuracy together),
    # so the loop gets no validation set of its own to score a second time.
    result = train(model, tokenizer, train_set, None, out, train_config, loss_fn=loss, collate_fn=collate,
                   eval_fn=columns, sample_fn=sample, meta=meta, resume=resume, progress=progress, overwrite=overwrite,
                   extra_files=stage_files)
    if distributed.is_main():  # under torchrun rank 0 alone writes into the run
        plot_dpo_metrics(out, result.step, initial)
    val_losses = [float(r["val_loss"]) for r in result.history if r.get("val_loss") not in (None, "")]
    return replace(result, val_loss=val_losses[-1] if val_losses else None)


# ---- the loss -----------------------------------------------------------------------------------

def sequence_logprobs(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                      reduction: str = "mean") -> torch.Tensor:
    """Each row's log-probability of its targets (-100 ignored), (N, T) -> (N,): their mean or their sum.

    ``model`` is a ``GPTModel`` or a wrapper of one (DDP, FSDP, ``torch.compile``): the scores come from its
    ``forward`` (``per_token``), which applies the output head only where there is a target: the prompt and
    the padding are most of a pair's positions, and the vocabulary-wide head is most of a small model's compute.
    """
    token_logps = model(inputs, targets, per_token=True)  # (N, T), 0 where the target is ignored
    total = token_logps.sum(-1)  # (N,)
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum(-1).clamp(min=1)


def dpo_terms(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Per-pair DPO loss and rewards from (2B,) log-probabilities, chosen rows first; each value is (B,)."""
    policy_chosen, policy_rejected = policy_logps.float().chunk(2)  # (B,), (B,)
    reference_chosen, reference_rejected = reference_logps.float().chunk(2)
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)  # (B,)
    chosen_reward = beta * (policy_chosen - reference_chosen).detach()  # the implicit reward (the paper, TRL)
    rejected_reward = beta * (policy_rejected - reference_rejected).detach()
    return {"loss": -F.logsigmoid(beta * logits), "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
            "reward_margin": chosen_reward - rejected_reward,
            "reward_accuracy": (chosen_reward > rejected_reward).float()}


class DPOLoss:
    """The training loop's ``loss_fn``: the mean DPO loss of a ``collate_preferences`` batch."""

    def __init__(self, beta: float, reduction: str = "mean") -> None:
        self.beta, self.reduction = beta, reduction

    def terms(self, model: torch.nn.Module, batch: tuple) -> dict[str, torch.Tensor]:
        inputs, targets, reference = batch  # (2B, T), (2B, T), (2B,)
        return dpo_terms(sequence_logprobs(model, inputs, targets, self.reduction), reference, self.beta)

    def __call__(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        return self.terms(model, batch)["loss"].mean()


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, loader: DataLoader, loss: DPOLoss, device: torch.device,
                   dtype: torch.dtype | None = None, max_batches: int | None = None) -> dict[str, float]:
    """The mean over pairs of each of ``PAIR_METRICS`` (loss, rewards, margin, accuracy)."""
    totals, n = dict.fromkeys(PAIR_METRICS, 0.0), 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with autocast(device, dtype):
            terms = loss.terms(model, to_device(batch, device))
        for key in PAIR_METRICS:
            totals[key] += terms[key].sum().item()
        n += len(terms["loss"])
    return {key: total / max(n, 1) for key, total in totals.items()}


# ---- the steps of the stage ----------------------------------------------------------------------

def _policy_model(settings: DPOSettings, out: Path, previous: dict, resume: bool,
                  seed: int) -> tuple[GPTModel, Tokenizer, PromptStyle]:
    """The model to train (on resume the run's own; ``train`` then loads its exact state), its tokenizer, and
    the prompt style to lay the pairs out in: the given one, else the starting run's."""
    torch.manual_seed(seed)
    if resume:
        model, tokenizer, _ = load_run(out)
        style_name = previous.get("prompt_style")
    else:
        model, tokenizer = build_model(None, settings.init, None, {}, command="finetune-dpo",
                                       lora=settings.lora_config())
        init_style = source_metadata(settings.init).get("prompt_style")
        if settings.prompt_style is None and init_style is None:
            log.warning("--init %s was not instruction-tuned by gptlab (no prompt style in its config.json); "
                        "laying the pairs out in %s", settings.init, DEFAULT_STYLE)
        style_name = settings.prompt_style or init_style
    if tokenizer.eot_id is None:
        raise GptlabError(f"the tokenizer {tokenizer.name!r} has no end-of-text token to pad and stop with")
    model.set_dropout(settings.dropout)
    return model.train(), tokenizer, get_prompt_style(style_name or DEFAULT_STYLE)


def _max_length(settings: DPOSettings, model: GPTModel) -> int:
    context = model.config.context_length
    if settings.max_length is not None and not 1 < settings.max_length <= context:
        raise GptlabError(f"--max-length must be between 2 and the model's context length {context}, "
                          f"got {settings.max_length}")
    return settings.max_length or context


def _attach_reference(model: GPTModel, parts: tuple[PreferenceDataset, ...], out: Path, resume: bool,
                      settings: DPOSettings, collate, batch_size: int, device: torch.device,
                      dtype: torch.dtype | None) -> str:
    """Give every pair the frozen reference's log-probabilities: computed now, or on resume the stored ones.

    Returns the text of ``REFERENCE_FILE``, which every checkpoint writes with its set.
    """
    if resume:
        try:
            text = read_run_file(out, REFERENCE_FILE, lambda path: path.read_text(encoding="utf-8"))
            stored = json.loads(text)
            values = [torch.tensor(stored[name], dtype=torch.float32).reshape(-1, 2) for name in ("train", "val")]
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            raise GptlabError(f"{out}: {REFERENCE_FILE} is missing or damaged, so the run cannot be resumed "
                              "exactly; start it over with --overwrite") from None
        for part, logps in zip(parts, values):
            part.set_reference(logps)
        return text
    # The same batches (file order, the run's batch size and precision) as the evaluations use, so that before
    # the first step the policy's log-probabilities equal these bit for bit and the loss is exactly ln 2.
    logps = [reference_logprobs(model, part, collate, batch_size, device, dtype, settings.logp_reduction)
             for part in parts]
    for part, values in zip(parts, logps):
        part.set_reference(values)
    return json.dumps({"logp_reduction": settings.logp_reduction, "train": logps[0].tolist(),
                       "val": logps[1].tolist()}) + "\n"


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, dataset: PreferenceDataset, collate, batch_size: int,
                       device: torch.device, dtype: torch.dtype | None = None,
                       reduction: str = "mean") -> torch.Tensor:
    """(N, 2) log-probabilities of each pair's (chosen, rejected) response under ``model``, in eval mode."""
    was_training = model.training
    model.to(device).eval()
    rows = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        inputs, targets = to_device(batch[:2], device)  # (2B, T), (2B, T)
        with autocast(device, dtype):
            logps = sequence_logprobs(model, inputs, targets, reduction).float()  # (2B,)
        rows.append(torch.stack(logps.chunk(2), dim=1).cpu())  # (B, 2)
    model.train(was_training)
    return torch.cat(rows) if rows else torch.zeros(0, 2)


def _evaluator(loss: DPOLoss, train_set: PreferenceDataset, val_set: PreferenceDataset, collate,
               train_config: TrainConfig, train_batches: int, device: torch.device, dtype: torch.dtype | None):
    """``eval_fn`` for the loop: rewards, margin and accuracy on the first training batches; all of them and
    the DPO loss (the ``val_loss`` column) on the validation pairs."""
    batch_size = train_config.batch_size
    train_part = Subset(train_set, range(min(len(train_set), train_batches * batch_size)))
    loaders = {"train": DataLoader(train_part, batch_size=batch_size, collate_fn=collate),
               "val": DataLoader(val_set, batch_size=batch_size, collate_fn=collate)}
    limits = {"train": None, "val": train_config.eval_batches}

    def columns(model: torch.nn.Module) -> dict[str, float]:
        row = {}
        for name, loader in loaders.items():
            if len(loader.dataset):
                metrics = evaluate_pairs(model, loader, loss, device, dtype, limits[name])
                if name == "train":  # the loop's train_loss column is the loss of the batches trained on
                    metrics.pop("loss")
                row.update({f"{name}_{key}": value for key, value in metrics.items()})
        return row

    return columns


def _in_eval_mode(model: torch.nn.Module, fn):
    model.eval()
    try:
        return fn(model)
    finally:
        model.train()


def _sampler(tokenizer: Tokenizer, style: PromptStyle, record: dict):
    """What ``train`` prints at each evaluation: the model's answer to one held-out record."""
    def sample(m: GPTModel) -> str:
        return respond_one(m, tokenizer, style, record, max_new_tokens=40)

    return sample


def plot_dpo_metrics(out: str | Path, step: int, initial: dict | None = None) -> None:
    """``rewards.png`` (reward margin, chosen and rejected rewards) and ``reward_accuracy.png`` against the
    step, from metrics.csv up to ``step``, starting at the evaluation before training (``initial``)."""
    out = Path(out)
    metrics = MetricsLog(out / METRICS_FILE, step)
    if initial:
        metrics.rows.insert(0, {"step": "0", **{k: str(v) for k, v in initial.items()}})
    if not any(r.get("val_reward_margin") or r.get("train_reward_margin") for r in metrics.rows):
        return
    metrics.plot(out / REWARDS_PLOT, f"{out.name}: DPO rewards (beta * log policy/reference)",
                 columns=(("train_reward_margin", "train margin"), ("val_reward_margin", "validation margin"),
                          ("val_chosen_reward", "validation chosen"), ("val_rejected_reward", "validation rejected")),
                 x="step", ylabel="reward")
    metrics.plot(out / ACCURACY_PLOT, f"{out.name}: reward accuracy (chosen beats rejected)",
                 columns=(("train_reward_accuracy", "train"), ("val_reward_accuracy", "validation")),
                 x="step", ylabel="share of pairs")


def format_dpo_summary(initial: dict | None, last: dict) -> str:
    """One line: the validation loss, margin and accuracy before and after, for the command line."""
    parts = []
    for key, label, fmt in (("val_loss", "val loss", "{:.4f}"), ("val_reward_margin", "reward margin", "{:.4f}"),
                            ("val_reward_accuracy", "reward accuracy", "{:.1%}")):
        if last.get(key) in (None, ""):
            continue
        after = fmt.format(float(last[key]))
        before = fmt.format(float(initial[key])) + " -> " if initial and key in initial else ""
        parts.append(f"{label} {before}{after}")
    return ", ".join(parts)

