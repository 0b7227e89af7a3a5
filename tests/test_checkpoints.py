"""Checkpoints are one consistent set, whatever kills the writer; a full disk is one line; nothing is left behind.

The kill loop forks this test process (torch already imported, so a child starts in milliseconds), lets the
child train a tiny model that checkpoints at every step, and kills it with SIGKILL at a random moment. After
every kill the run must load, its weights must be those of its training state (same step), and a resume must
carry on; at the end the run must equal one that was never interrupted, to the bit.
"""
import csv
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gptlab.cli import main
from gptlab.data import TokenWindowDataset
from gptlab.model import GPTConfig, GPTModel
from gptlab.run import CHECKPOINT_PREFIX, METRICS_FILE, STATE_FILE, WEIGHTS_FILE, holds_run, model_state_dict, run_file
from gptlab.weights import load_run
from gptlab.tokenizer import get_tokenizer
from gptlab.train import TrainConfig, train

STEPS = 30


def tiny_run(out, resume=False, max_steps=STEPS, **config):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, 1200)
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=50, context_length=16, dropout=0.1))
    config = TrainConfig(**{"max_steps": max_steps, "batch_size": 4, "lr": 3e-3, "eval_interval": 1, "seed": 1,
                            "device": "cpu", **config})
    return train(model, get_tokenizer("gpt2"), TokenWindowDataset(tokens[:1000], 16, 8),
                 TokenWindowDataset(tokens[1000:], 16, 16), out, config, resume=resume, progress=False)


def metrics(out) -> list[dict]:
    with open(run_file(out, METRICS_FILE), newline="") as f:
        return list(csv.DictReader(f))


def assert_consistent(out) -> int:
    """Every reader sees one step: the weights, the training state and metrics.csv agree. Returns the step."""
    model, _, _ = load_run(out)
    payload = torch.load(run_file(out, STATE_FILE), weights_only=True)
    step = payload["state"]["step"]
    with safe_open(run_file(out, WEIGHTS_FILE), framework="pt") as f:
        assert f.metadata()["step"] == str(step)
    weights = model_state_dict(model)  # a tied head once
    assert payload["model"].keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, payload["model"][name]), name
    assert int(metrics(out)[-1]["step"]) == step
    return step


def leftovers(out) -> list[str]:
    return sorted(p.name for p in Path(out).iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def test_kill_9_at_random_moments_never_breaks_the_run(tmp_path, monkeypatch):
    if os.environ.get("GPTLAB_KILL9_INNER") != "1":
        # A child forked from a process whose OpenMP pool earlier tests started can hang before it trains; the
        # loop runs in a fresh one-thread interpreter, which never starts one.
        inner = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                f"{__file__}::test_kill_9_at_random_moments_never_breaks_the_run"],
                               env={**os.environ, "GPTLAB_KILL9_INNER": "1", "OMP_NUM_THREADS": "1"},
                               capture_output=True, text=True, timeout=600)
        assert inner.returncode == 0, inner.stdout[-4000:] + inner.stderr[-2000:]
        return
    # loss.png costs a second per checkpoint on a busy 2-core machine; a stand-in file keeps each step short,
    # so that the 15 kills spread over many checkpoints (the set is written the same way, plot or not)
    from gptlab.train import MetricsLog

    monkeypatch.setattr(MetricsLog, "plot", lambda self, path, title: Path(path).write_text(self.text()))
    reference = tmp_path / "reference"
    tiny_run(reference)
    out = tmp_path / "killed"
    rng = random.Random(23)
    kills, found = 0, {"committed set being moved": 0, "uncommitted set": 0, "between checkpoints": 0}
    steps_seen = []
    while kills < 15:
        pid = os.fork()
        if pid == 0:  # the child: train until killed (renames slowed a little, so kills land between them too)
            replace = os.replace
            os.replace = lambda a, b: (time.sleep(0.1), replace(a, b))[1]
            try:
                tiny_run(out, resume=holds_run(out))
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if not os.WIFSIGNALED(status):
            pytest.fail("the child finished before it was killed; give it more steps")
        kills += 1
        names = leftovers(out) if out.exists() else []
        if any(n.endswith(".ready") for n in names):
            found["committed set being moved"] += 1
        elif any(n.startswith(CHECKPOINT_PREFIX) for n in names):
            found["uncommitted set"] += 1
        else:
            found["between checkpoints"] += 1
        if holds_run(out):
            steps_seen.append(assert_consistent(out))
    result = tiny_run(out, resume=holds_run(out))  # the last resume runs to the end
    print(f"\n{kills} kills: {found}; steps at the kills: {steps_seen}")
    assert result.step == STEPS and leftovers(out) == []
    assert found["committed set being moved"] + found["uncommitted set"] >= 3  # kills did land inside checkpoints
    a, b = metrics(reference), metrics(out)
    assert [(r["step"], r["train_loss"], r["val_loss"]) for r in a] == [(r["step"], r["train_loss"], r["val_loss"])
                                                                        for r in b]
    wa, wb = load_run(reference)[0].state_dict(), load_run(out)[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_set_committed_but_not_moved_is_what_readers_see_and_the_next_start_finishes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    tiny_run(out, max_steps=2)
    replace, moves = os.replace, []

    def dies_after_two_moves(a, b):
        if Path(a).parent.name.endswith(".ready"):  # moving a committed set's file into place
            moves.append(b)
            if len(moves) > 2:
                raise KeyboardInterrupt("killed between the renames")
        return replace(a, b)

    monkeypatch.setattr(os, "replace", dies_after_two_moves)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(out, resume=True, max_steps=3)
    monkeypatch.setattr(os, "replace", replace)
    assert any(n.endswith(".ready") for n in leftovers(out))  # committed, two files moved, the rest not
    assert assert_consistent(out) == 3  # every reader already sees step 3
    result = tiny_run(out, resume=True, max_steps=4)
    assert result.step == 4 and leftovers(out) == [] and assert_consistent(out) == 4


def test_a_write_killed_before_the_commit_leaves_the_previous_set(tmp_path, monkeypatch):
    out = tmp_path / "run"
    tiny_run(out, max_steps=2)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("gptlab.run.save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(out, resume=True, max_steps=3)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before and leftovers(out) == []


def test_stale_temporary_files_are_removed_when_the_run_starts_again(tmp_path):
    out = tmp_path / "run"
    tiny_run(out, max_steps=2)
    (out / ".model.safetensors.k2j4h5g6.tmp").write_bytes(b"x" * 1000)  # gptlab's atomic_write, killed
    (out / ".tmpAb3dE9").write_bytes(b"x" * 1000)  # safetensors' own temporary file, killed
    (out / f"{CHECKPOINT_PREFIX}2.abcd1234.tmp").mkdir()  # a checkpoint killed before its commit
    (out / f"{CHECKPOINT_PREFIX}2.abcd1234.tmp" / "train_state.pt").write_bytes(b"partial")
    (out / "notes.txt").write_text("mine")  # not gptlab's: stays
    tiny_run(out, resume=True, max_steps=3)
    assert leftovers(out) == [] and (out / "notes.txt").read_text() == "mine"


def test_overwrite_removes_stale_files_and_the_old_runs_outputs(tmp_path, capsys, verdict_path):
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(verdict_path), "--preset", "tiny", "--out", str(out), "--max-steps", "1",
            "--quiet", "--sample-prompt", ""]
    assert main(args) == 0
    (out / "evaluation.json").write_text("{}")  # another stage's output
    (out / ".metrics.csv.a1b2c3d4.tmp").write_text("half")
    (out / ".tmpQwErTy").write_text("half")
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "evaluation.json").exists() and leftovers(out) == []


def test_overwrite_whose_new_run_fails_to_start_keeps_the_old_run(tmp_path, capsys, verdict_path):
    out = tmp_path / "run"
    base = ["pretrain", "--preset", "tiny", "--out", str(out), "--max-steps", "1", "--quiet", "--sample-prompt", ""]
    assert main([*base, "--data", str(verdict_path)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (tmp_path / "short.txt").write_text("too short")
    assert main([*base, "--data", str(tmp_path / "short.txt"), "--overwrite"]) == 2
    assert "one training window needs" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# ---- a full disk -------------------------------------------------------------------------------------

def pretrain_args(out, data, max_steps, *extra):
    return ["pretrain", "--data", str(data), "--preset", "tiny", "--out", str(out), "--max-steps", str(max_steps),
            "--quiet", "--sample-prompt", "", *extra]


@pytest.mark.parametrize("where", ["torch.save", "safetensors", "metrics.csv"])
def test_a_full_disk_is_one_line_naming_the_file_and_the_last_checkpoint(tmp_path, capsys, verdict_path,
                                                                       monkeypatch, where):
    from safetensors import SafetensorError

    out = tmp_path / "run"
    # metrics.csv is also written between checkpoints, at each train-loss row: a full disk may strike there
    schedule = ["--eval-interval", "2", "--log-interval", "1"] if where == "metrics.csv" else ["--eval-interval", "1"]
    assert main(pretrain_args(out, verdict_path, 2, *schedule)) == 0
    capsys.readouterr()

    def full(*args, **kwargs):
        if where == "safetensors":  # what safetensors' native writer raises
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device")

    target = {"torch.save": (torch, "save"), "safetensors": ("gptlab.run.save_file",),
              "metrics.csv": (Path, "write_text")}[where]
    monkeypatch.setattr(*target, full)
    name = {"torch.save": STATE_FILE, "safetensors": WEIGHTS_FILE, "metrics.csv": METRICS_FILE}[where]
    code = main(pretrain_args(out, verdict_path, 4, "--resume"))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{out / name}: cannot write it (no space left on device)" in err
    assert f"the last intact checkpoint is step 2 in {out}" in err
    assert assert_consistent(out) == 2 and leftovers(out) == []
    monkeypatch.undo()  # room on the disk again: the run goes on from its last checkpoint
    assert main(pretrain_args(out, verdict_path, 4, "--resume")) == 0 and assert_consistent(out) == 4


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("mounting a tmpfs needs root (the injected-ENOSPC tests above cover the same code)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_really_full_disk(small_disk, tmp_path, capsys):
    from gptlab.bpe import train_bpe

    text = (Path(__file__).resolve().parent.parent / "data" / "the-verdict.txt").read_text()
    train_bpe(text, 300).save(tmp_path / "tok")  # a 300-token vocabulary keeps a checkpoint near 0.5 MB
    out = small_disk / "run"
    args = ["pretrain", "--data", str(Path(__file__).resolve().parent.parent / "data" / "the-verdict.txt"),
            "--tokenizer", str(tmp_path / "tok"), "--preset", "tiny", "--out", str(out), "--eval-interval", "1",
            "--quiet", "--sample-prompt", ""]
    assert main([*args, "--max-steps", "1"]) == 0
    capsys.readouterr()
    free = shutil.disk_usage(small_disk).free
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free - 200_000))  # leave less than one checkpoint's room
    assert main([*args, "--max-steps", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no space left on device" in err
    assert f"the last intact checkpoint is step 1 in {out}" in err
    assert assert_consistent(out) == 1 and leftovers(out) == []
    filler.unlink()
    assert main([*args, "--max-steps", "3", "--resume"]) == 0 and assert_consistent(out) == 3


# ---- modes, signals ----------------------------------------------------------------------------------

def test_files_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        tiny_run(tmp_path / "run", max_steps=1)
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert modes == {name: 0o640 for name in ("config.json", "model.safetensors", "train_state.pt", "metrics.csv",
                                              "loss.png")}
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o750


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_and_exits_with_the_shells_status(tmp_path, capsys, verdict_path, monkeypatch, sig, status):
    from gptlab.train import _Run

    evaluate = _Run.evaluate_and_checkpoint

    def signalled_at_step_2(self, bar):
        evaluate(self, bar)
        if self.state["step"] == 2:
            signal.raise_signal(sig)  # as from the shell: the handler asks the loop to stop

    monkeypatch.setattr(_Run, "evaluate_and_checkpoint", signalled_at_step_2)
    out = tmp_path / "run"
    assert main(pretrain_args(out, verdict_path, 100000, "--eval-interval", "1")) == status
    assert "stopped: step 2" in capsys.readouterr().out and assert_consistent(out) == 2
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 100000
