"""torchrun: 2 gloo ranks x batch b train exactly as 1 process x batch 2b (DDP and FSDP2), stop and resume
together, write into the run from rank 0 only, and fail together when one rank raises.

The jobs are tests/dist_job.py, a few per launch (a launch costs seconds of imports on each rank).
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import dist_job  # tests/dist_job.py (pytest puts tests/ on the path)
from gptlab import distributed
from gptlab.data import EpochBatchSampler
from gptlab.errors import GptlabError

JOB = Path(__file__).with_name("dist_job.py")
TOL = 1e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GPTLAB_DIST_TIMEOUT": "30"}


def launch(specs: list[dict], timeout: float = 240) -> subprocess.CompletedProcess:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    return subprocess.run([*torchrun, str(JOB), json.dumps(specs)], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


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
          "lora": {"batch_size": 8, "lora": True}, "accum": {"batch_size": 4, "grad_accum": 2},
          "dpo": {"batch_size": 8, "dpo": True}}
WORDS = {"ham": "see you at lunch later ok home".split(), "spam": "win cash prize now free claim".split()}


def write_labelled_texts(path: Path) -> str:
    """80 texts whose words give their label away, of varied lengths (batches are padded): a 60% split trains
    on 48, whole global batches of 8."""
    rows = [(label, " ".join(WORDS[label][(i * 7 + j) % 6] for j in range(2 + i % 9)))
            for i in range(40) for label in WORDS]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("label", "text"), *rows])
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    texts = write_labelled_texts(tmp / "texts.csv")
    for spec in jobs(tmp, "s-", {**SINGLE, "stage": {"batch_size": 8, "classifier_data": texts}}):
        dist_job.run_job(spec)  # the references: one process, here
    ddp = launch(jobs(tmp, "d-", {
        "plain": {"batch_size": 4}, "accum": {"batch_size": 2, "grad_accum": 2},
        "cls": {"batch_size": 4, "classifier": True}, "lora": {"batch_size": 4, "lora": True},
        "stage": {"batch_size": 4, "classifier_data": texts}, "dpo": {"batch_size": 4, "dpo": True},
        "whole": {"batch_size": 4, "steps": 6, "dropout": 0.1},
        # rank 1 alone gets the Ctrl-C, in step 4; both ranks stop after it, then resume to step 6
        "split": {"batch_size": 4, "steps": 6, "dropout": 0.1, "stop_at": 3},
    }) + jobs(tmp, "d-", {"split": {"batch_size": 4, "steps": 6, "dropout": 0.1, "resume": True,
                                    "result": str(tmp / "d-resumed.json")}}))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = launch(jobs(tmp, "f-", {"plain": {"batch_size": 4, "fsdp": True},
                                   "accum": {"batch_size": 2, "grad_accum": 2, "fsdp": True},
                                   "whole": {"batch_size": 4, "steps": 6, "dropout": 0.1, "fsdp": True},
                                   "split": {"batch_size": 4, "steps": 6, "dropout": 0.1, "fsdp": True, "stop_at": 3}})
                  + jobs(tmp, "f-", {"split": {"batch_size": 4, "steps": 6, "dropout": 0.1, "fsdp": True,
                                               "resume": True, "result": str(tmp / "f-resumed.json")}}))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    return tmp


def test_ddp_two_ranks_equal_one_process_with_twice_the_batch(runs):
    assert_same_run(runs, "s-plain", "d-plain")
    assert_same_run(runs, "s-accum", "d-accum", ref_accum=2, accum=2)  # no_sync on the first micro-step
    assert_same_run(runs, "s-cls", "d-cls")  # the classifier stage's loss and head
    assert_same_run(runs, "s-lora", "d-lora")  # LoRA: frozen base, adapters averaged
    assert_same_run(runs, "s-dpo", "d-dpo")  # DPO's loss: sequence log-probabilities through forward()


def test_fsdp2_two_ranks_equal_one_process(runs):
    # checks the averaging that gloo once got wrong (pytorch issue 162338: summed gradients) against one process
    assert_same_run(runs, "s-plain", "f-plain")
    assert_same_run(runs, "s-accum", "f-accum", ref_accum=2, accum=2)
    run = runs / "f-plain"  # an ordinary full model.safetensors, and the sharded training state beside it
    assert (run / "train_state.dcp" / ".metadata").is_file()
    assert weights(run)["wte.weight"].shape == (50, 32)


def test_the_classifier_stage_under_two_ranks_equals_one_process(runs):
    wa, wb = weights(runs / "s-stage"), weights(runs / "d-stage")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= TOL
    a, b = (json.loads((runs / f"{name}.json").read_text()) for name in ("s-stage", "d-stage"))
    assert a["step"] == b["step"] == 6 and a["test_accuracy"] == b["test_accuracy"]
    assert json.loads((runs / "d-stage.rank1.json").read_text())["writes"] == []  # evaluation.json, plots: rank 0
    assert (runs / "d-stage" / "evaluation.json").is_file()


@pytest.mark.parametrize("kind", ["d", "f"])  # DDP, FSDP2 (its sharded state read back by every rank)
def test_stop_and_resume_equals_an_uninterrupted_run(runs, kind):
    for result in (f"{kind}-split.json", f"{kind}-split.rank1.json"):  # both stopped after step 4 (rank 1's signal)
        stopped = json.loads((runs / result).read_text())
        assert stopped["interrupted"] and stopped["step"] == 4
    resumed = json.loads((runs / f"{kind}-resumed.json").read_text())
    assert resumed["step"] == 6 and not resumed["interrupted"]
    with open(runs / f"{kind}-whole" / "metrics.csv") as f, open(runs / f"{kind}-split" / "metrics.csv") as g:
        whole, split = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [r["step"] for r in split] == ["2", "4", "6"]
    assert [(r["train_loss"], r["val_loss"]) for r in whole] == [(r["train_loss"], r["val_loss"]) for r in split]
    wa, wb = weights(runs / f"{kind}-whole"), weights(runs / f"{kind}-split")
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


def test_ranks_read_disjoint_shares_of_one_global_order(monkeypatch):
    one = list(EpochBatchSampler(20, 4, True, 7))
    shares = [list(EpochBatchSampler(20, 2, True, 7, rank=r, world=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*shares)] == one[:5]  # 20 // (2 x 2) = 5 global batches
    assert distributed.world_size() == 1 and distributed.mean(3.0) == 3.0 and distributed.any_rank(True)
    # what the command reports in one line as "lost the other ranks", and what keeps its traceback (a bug)
    assert distributed.lost_peers(RuntimeError("[gloo/transport/tcp/pair.cc:537] Connection reset by peer"))
    assert not distributed.lost_peers(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    monkeypatch.setenv("GPTLAB_DIST_TIMEOUT", "90")
    assert distributed.timeout_s() == 90.0
    monkeypatch.setenv("GPTLAB_DIST_TIMEOUT", "soon")
    with pytest.raises(GptlabError, match="GPTLAB_DIST_TIMEOUT='soon'"):
        distributed.timeout_s()


def gptlab_under_torchrun(args: list[str], ranks: int = 2) -> subprocess.Popen:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    return subprocess.Popen([*torchrun, "-m", "gptlab", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)


def test_sigterm_to_torchrun_checkpoints_once_and_the_ranks_exit_0(tmp_path, verdict_path):
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(verdict_path), "--preset", "tiny", "--out", str(out), "--batch-size", "2",
            "--max-steps", "400", "--eval-interval", "2", "--sample-prompt", "", "--quiet", "--device", "cpu"]
    launcher = gptlab_under_torchrun(args)
    deadline = time.monotonic() + 120
    while not (out / "metrics.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank, as it does a Ctrl-C
    stdout, stderr = launcher.communicate(timeout=90)
    # every rank finished its step, rank 0 checkpointed once and said so (rank 1 prints nothing); no rank was
    # killed: torchrun lists a rank that failed or that it had to kill with its exit code
    assert stdout.count("stopped: step") == 1 and "continue with --resume" in stdout, stdout + stderr
    assert "exitcode" not in stderr, stderr[-3000:]
    step = int(stdout.split("stopped: step ")[1].split(",")[0])
    assert 2 <= step < 400
    with safe_open(out / "model.safetensors", "pt") as f:  # the checkpoint of the step it stopped after
        assert int(f.metadata()["step"]) == step
    assert launcher.returncode == 1  # torchrun's own: it re-raises the signal once its ranks have exited
    # one process cannot continue what two started: the global batch and the data position depend on it
    alone = subprocess.run([sys.executable, "-m", "gptlab", "pretrain", "--out", str(out), "--resume"],
                           capture_output=True, text=True, env=ENV, timeout=120)
    assert alone.returncode == 2 and "trained on 2 rank(s)" in alone.stderr, alone.stderr


def test_the_instruct_and_dpo_stages_run_whole_under_torchrun(tmp_path):
    # Their losses are tested equal to one process above; here the whole commands, one after the other, as a
    # user runs them: the stage files come from rank 0 and a single process loads the result.
    records = json.loads((Path(__file__).parents[1] / "data" / "instruction-data-with-preference.json").read_text())
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(records[:40]))
    common = ["--preset", "tiny", "--batch-size", "2", "--max-steps", "3", "--eval-interval", "3", "--quiet",
              "--device", "cpu", "--max-length", "64"]
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    for args in (["finetune-instruct", "--data", str(data), "--out", str(sft), *common],
                 ["finetune-dpo", "--data", str(data), "--init", str(sft), "--out", str(dpo),
                  *[a for a in common if a not in ("--preset", "tiny")]]):
        launcher = gptlab_under_torchrun(args)
        stdout, stderr = launcher.communicate(timeout=180)
        assert launcher.returncode == 0, stderr[-3000:]
        assert "global batch 4 = batch size 2 x grad accum 1 x 2 ranks" in stderr, stderr[-2000:]
        assert stdout.count("done: step 3") == 1, stdout  # rank 0's summary only
    assert (sft / "test.json").exists() and (dpo / "model.safetensors").exists()
    answers = tmp_path / "answers.json"
    respond = subprocess.run([sys.executable, "-m", "gptlab", "respond", "--model", str(dpo), "--input",
                              str(sft / "test.json"), "--output", str(answers), "--limit", "2", "--max-new-tokens",
                              "4", "--quiet"], capture_output=True, text=True, env=ENV, timeout=120)
    assert respond.returncode == 0 and len(json.loads(answers.read_text())) == 2, respond.stderr


def test_a_rank_with_no_validation_batch_of_its_own_still_runs_the_forward_fsdp_needs():
    from gptlab.train import score_share

    calls = []

    def loss_fn(model, batch):
        calls.append(batch)
        return torch.tensor(2.0)

    one_batch = [torch.tensor([7])]
    model = torch.nn.Linear(1, 1)
    assert score_share(model, one_batch, loss_fn, torch.device("cpu"), rank=1, world=2) == (0.0, 0)
    assert calls == one_batch  # rank 0's batch, scored and left out: both ranks ran one forward
    calls.clear()
    assert score_share(model, one_batch, loss_fn, torch.device("cpu"), rank=0, world=2) == (2.0, 1)
    assert len(calls) == 1
