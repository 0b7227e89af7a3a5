"""A tiny training job that tests/test_distributed.py runs in one process or under torchrun (gloo, 2 ranks).

    python tests/dist_job.py '[{"result": "R.json", "out": "RUN", "batch_size": 4, ...}, ...]'

Each job (one after another, in the one process group) writes its R(.rankN).json: each micro-step's training loss on this rank, and (on ranks other than 0) every
write into the run directory that Python's audit hooks saw, so the test can check that rank 0 alone wrote.
"""
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from gptlab import distributed
from gptlab.config import LoRAConfig, TrainConfig
from gptlab.data import TokenWindowDataset
from gptlab.finetune.classifier import classification_loss, finetune_classifier
from gptlab.finetune.dpo import DPOLoss
from gptlab.model import GPTConfig, GPTModel
from gptlab.surgery import add_classifier_head, add_lora
from gptlab.tokenizer import get_tokenizer
from gptlab.train import lm_loss, train

WRITE_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.chmod")


def audit_writes(out: Path, seen: list) -> None:
    def hook(event, args):
        if event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1] or "r", args[2] or 0
            if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                path = str(args[0])
            else:
                return
        elif event in WRITE_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
        else:
            return
        if str(out.resolve()) in os.path.abspath(path) or str(out) in path:
            seen.append(f"{event} {path}")

    sys.addaudithook(hook)


class ClassWindows(torch.utils.data.Dataset):
    """Token windows labelled by their first token's parity: a two-class classifier's data."""

    def __init__(self, windows):
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        x, _ = self.windows[i]
        return x, torch.tensor(len(x)), torch.tensor(int(x[0]) % 2)  # ids, length, label


class PairWindows(torch.utils.data.Dataset):
    """Preference pairs for a DPO loss: window i is chosen over window i + n/2."""

    def __init__(self, windows):
        self.windows = windows

    def __len__(self):
        return len(self.windows) // 2

    def __getitem__(self, i):
        return self.windows[i], self.windows[i + len(self)]


def collate_pairs(items):
    """As ``collate_preferences``: the chosen rows, then the rejected; the targets' first half masked (the
    prompt); the reference's log-probabilities 0."""
    rows = [chosen for chosen, _ in items] + [rejected for _, rejected in items]
    inputs, targets = torch.stack([x for x, _ in rows]), torch.stack([y for _, y in rows])  # (2B, T) each
    targets[:, : targets.shape[1] // 2] = -100
    return inputs, targets, torch.zeros(len(rows))


def main() -> None:
    distributed.setup("cpu")
    for spec in json.loads(sys.argv[1]):
        run_job(spec)
    distributed.teardown()


def run_job(spec: dict) -> None:
    rank, out, result = distributed.rank(), Path(spec["out"]), Path(spec["result"])
    seen: list = []
    if rank != 0:
        audit_writes(out, seen)
    if "classifier_data" in spec:  # the whole stage, as `gptlab finetune-classifier` runs it
        training = {"max_steps": 6, "batch_size": spec["batch_size"], "lr": 3e-3, "eval_interval": 3, "seed": 1,
                    "device": "cpu"}
        res = finetune_classifier(spec["classifier_data"], out, training, progress=False, preset="tiny",
                                  split=(0.6, 0.2, 0.2))
        name = result if rank == 0 else result.with_suffix(f".rank{rank}.json")
        name.write_text(json.dumps({"writes": seen, "step": res.train.step,
                                    "test_accuracy": res.reports["test"].accuracy}))
        return
    torch.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, 50, 2700)
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=50, context_length=16, dropout=spec.get("dropout", 0.0)))
    # 128 training and 32 validation windows: whole global batches of 8
    train_set, val_set = TokenWindowDataset(tokens[:2049], 16, 16), TokenWindowDataset(tokens[2100:2613], 16, 16)
    loss_fn, collate = lm_loss, None
    if spec.get("classifier"):
        add_classifier_head(model, 2)
        train_set, val_set, loss_fn = ClassWindows(train_set), ClassWindows(val_set), classification_loss
    if spec.get("dpo"):  # the DPO stage's loss: sequence log-probabilities through the model's forward
        train_set, val_set, loss_fn, collate = PairWindows(train_set), PairWindows(val_set), DPOLoss(0.5), collate_pairs
    if spec.get("lora"):
        add_lora(model, LoRAConfig(rank=4, alpha=8), base_ref={})
    losses = []

    def recorded(m, batch):
        loss = loss_fn(m, batch)
        if m.training:
            if spec.get("raise_at") is not None and rank == 1 and len(losses) == spec["raise_at"]:
                raise RuntimeError("rank 1 fails on purpose")
            if spec.get("stop_at") is not None and rank == 1 and len(losses) == spec["stop_at"]:
                signal.raise_signal(signal.SIGINT)  # a Ctrl-C that reaches rank 1 alone: every rank stops
            losses.append(loss.item())
        return loss

    config = TrainConfig(max_steps=spec.get("steps", 4), batch_size=spec["batch_size"],
                         grad_accum=spec.get("grad_accum", 1), lr=3e-3, eval_interval=spec.get("eval_interval", 2),
                         seed=1, device="cpu", fsdp=spec.get("fsdp", False), eval_batches=3)
    res = train(model, get_tokenizer("gpt2"), train_set, val_set, out, config, loss_fn=recorded, collate_fn=collate,
                resume=spec.get("resume", False), progress=False)
    name = result if rank == 0 else result.with_suffix(f".rank{rank}.json")
    name.write_text(json.dumps({"losses": losses, "writes": seen, "step": res.step, "val_loss": res.val_loss,
                                "interrupted": res.interrupted}))


if __name__ == "__main__":
    main()
