"""torchrun: 2 gloo ranks x batch b train exactly as 1 process x batch 2b (DDP and FSDP2), stop and resume
together, write into the run from rank 0 only, and fail together when one rank raises.

The jobs are tests/dist_job.py, a few per launch (a launch costs seconds of imports on each rank).
"""
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab import distributed
from gptlab.data import EpochBatchSampler

JOB = Path(__file__).with_name("dist_job.py")
TOL = 1e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GPTLAB_DIST_TIMEOUT": "30"}


def launch(specs: list[dict], ranks: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone"]
    cmd = [*(torchrun if ranks > 1 else [sys.executable]), str(JOB), json.dumps(specs)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def jobs(tmp: Path, prefix: str, specs: dict[str, dict]) -> list[dict]:
    return [{"result": str(tmp / f"{prefix}{name}.json"), "out": str(tmp / f"{prefix}{name}"), **spec}
            for name, spec in specs.items()]


def step_losses(tmp: Path, name: str, ranks: int, micro_steps: int) -> list[float]:
    """Each optimizer step's loss: the mean over ranks and its micro-steps."""
    per_rank = [json.loads((tmp / (f"{name}.json" if r == 0 else f"{name}.rank{r}.json")).read_text())["losses"]
                for r in range(ranks)]
    flat = [sum(values) / ranks for values in zip(*per_rank)]
    return [sum(flat[i : i + micro_steps]) / micro_steps for i in range(0, len(flat), micro_steps)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    name = "adapter.safetensors" if (run / "adapter.safetensors").exists() else "model.safetensors"
    return load_file(run / name)


def assert_same_run(tmp: Path, ref: str, ranks_run: str, ref_accum: int = 1, accum: int = 1) -> None:
    a, b = step_losses(tmp, ref, 1, ref_accum), step_losses(tmp, ranks_run, 2, accum)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) <= TOL, (a, b)
    wa, wb = weights(tmp / ref), weights(tmp / ranks_run)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= TOL
    va = json.loads((tmp / f"{ref}.json").read_text())["val_loss"]
    vb = json.loads((tmp / f"{ranks_run}.json").read_text())["val_loss"]
    assert abs(va - vb) <= TOL  # every rank scored its share of the validation batches


SINGLE = {"plain": {"batch_size": 8}, "cls": {"batch_size": 8, "classifier": True},
          "lora": {"batch_size": 8, "lora": True}, "accum": {"batch_size": 4, "grad_accum": 2}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    single = launch(jobs(tmp, "s-", SINGLE), ranks=1)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = launch(jobs(tmp, "d-", {
        "plain": {"batch_size": 4}, "accum": {"batch_size": 2, "grad_accum": 2},
        "cls": {"batch_size": 4, "classifier": True}, "lora": {"batch_size": 4, "lora": True},
        "whole": {"batch_size": 4, "steps": 6, "dropout": 0.1},
        # rank 1 alone gets the Ctrl-C, in step 4; both ranks stop after it, then resume to step 6
        "split": {"batch_size": 4, "steps": 6, "dropout": 0.1, "stop_at": 3},
    }) + jobs(tmp, "d-", {"split": {"batch_size": 4, "steps": 6, "dropout": 0.1, "resume": True}}))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = launch(jobs(tmp, "f-", {"plain": {"batch_size": 4, "fsdp": True},
                                   "accum": {"batch_size": 2, "grad_accum": 2, "fsdp": True}}))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    return tmp


def test_ddp_two_ranks_equal_one_process_with_twice_the_batch(runs):
    assert_same_run(runs, "s-plain", "d-plain")
    assert_same_run(runs, "s-accum", "d-accum", ref_accum=2, accum=2)  # no_sync on the first micro-step
    assert_same_run(runs, "s-cls", "d-cls")  # the classifier stage's loss and head
    assert_same_run(runs, "s-lora", "d-lora")  # LoRA: frozen base, adapters averaged


def test_fsdp2_two_ranks_equal_one_process(runs):
    # checks the averaging that gloo once got wrong (pytorch issue 162338: summed gradients) against one process
    assert_same_run(runs, "s-plain", "f-plain")
    assert_same_run(runs, "s-accum", "f-accum", ref_accum=2, accum=2)
    run = runs / "f-plain"  # an ordinary full model.safetensors, and the sharded training state beside it
    assert (run / "train_state.dcp" / ".metadata").is_file()
    assert weights(run)["wte.weight"].shape == (50, 32)


def test_ddp_stop_and_resume_equals_an_uninterrupted_run(runs):
    stopped = json.loads((runs / "d-split.json").read_text())
    assert stopped["step"] == 6 and not stopped["interrupted"]  # the result of the resumed half
    with open(runs / "d-whole" / "metrics.csv") as f, open(runs / "d-split" / "metrics.csv") as g:
        whole, split = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [r["step"] for r in split] == ["2", "4", "6"]
    assert [(r["train_loss"], r["val_loss"]) for r in whole] == [(r["train_loss"], r["val_loss"]) for r in split]
    wa, wb = weights(runs / "d-whole"), weights(runs / "d-split")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # dropout on: each rank's own RNG stream was restored


def test_only_rank_0_writes_into_the_run_directory(runs):
    for name in ("d-plain", "d-split", "d-lora"):
        assert json.loads((runs / f"{name}.rank1.json").read_text())["writes"] == []
    # under FSDP rank 1 writes its own shards, and only into the hidden folder that becomes train_state.dcp
    writes = json.loads((runs / "f-plain.rank1.json").read_text())["writes"]
    assert writes and all(".dcp.tmp" in w for w in writes)


def test_a_raising_rank_fails_the_job_quickly(tmp_path):
    start = time.monotonic()
    result = launch(jobs(tmp_path, "", {"bad": {"batch_size": 4, "raise_at": 2}}), timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    assert "rank 1 fails on purpose" in result.stderr


def test_ranks_read_disjoint_shares_of_one_global_order():
    one = list(EpochBatchSampler(20, 4, True, 7))
    shares = [list(EpochBatchSampler(20, 2, True, 7, rank=r, world=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*shares)] == one[:5]  # 20 // (2 x 2) = 5 global batches
    assert distributed.world_size() == 1 and distributed.mean(3.0) == 3.0 and distributed.any_rank(True)
