import csv
import json
import signal

import numpy as np
import pytest
import torch

import gptlab
from gptlab.data import TokenWindowDataset
from gptlab.errors import GptlabError
from gptlab.model import GPTConfig, GPTModel
from gptlab.pretrain import pretrain

from gptlab.weights import load_run
from gptlab.tokenizer import get_tokenizer
from gptlab.train import TrainConfig, lr_at, make_optimizer, train


def small_config(**kw):
    return TrainConfig(**{"max_steps": 8, "batch_size": 4, "lr": 3e-3, "eval_interval": 2, "seed": 1, **kw})


def run_tiny(out, config, stop_at=None, resume=False, dropout=0.1):
    """Train a tiny model on random tokens; ``stop_at`` sends SIGINT at that evaluation step."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, 2000)
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=50, context_length=16, dropout=dropout))
    train_set = TokenWindowDataset(tokens[:1600], 16, 8)
    val_set = TokenWindowDataset(tokens[1600:], 16, 16)

    def eval_fn(m):
        if stop_at is not None and eval_fn.calls == stop_at:
            signal.raise_signal(signal.SIGINT)
        eval_fn.calls += 1
        return {"custom": 1.0}

    eval_fn.calls = 1
    return train(model, get_tokenizer("gpt2"), train_set, val_set, out, config, eval_fn=eval_fn,
                 resume=resume, progress=False)


def rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    whole = run_tiny(tmp_path / "whole", small_config())
    assert not whole.interrupted and whole.step == 8
    stopped = run_tiny(tmp_path / "split", small_config(), stop_at=2)  # SIGINT during the step-4 evaluation
    assert stopped.interrupted and stopped.step == 4
    resumed = run_tiny(tmp_path / "split", small_config(), resume=True)
    assert resumed.step == 8
    a, b = rows(tmp_path / "whole"), rows(tmp_path / "split")
    assert [r["step"] for r in b] == ["2", "4", "6", "8"]
    assert [(r["train_loss"], r["val_loss"]) for r in a] == [(r["train_loss"], r["val_loss"]) for r in b]
    wa = load_run(tmp_path / "whole")[0].state_dict()
    wb = load_run(tmp_path / "split")[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stop_between_evaluations_checkpoints_too(tmp_path):
    run_tiny(tmp_path / "whole", small_config(eval_interval=4))
    config = small_config(eval_interval=4)
    model_run = tmp_path / "split"

    class StopAtStep3:
        calls = 0

    original = torch.optim.AdamW.step

    def step_then_maybe_stop(self, *a, **kw):
        out = original(self, *a, **kw)
        StopAtStep3.calls += 1
        if StopAtStep3.calls == 3:
            signal.raise_signal(signal.SIGTERM)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", step_then_maybe_stop)
        stopped = run_tiny(model_run, config)
    assert stopped.interrupted and stopped.step == 3
    run_tiny(model_run, config, resume=True)
    assert [r["train_loss"] for r in rows(tmp_path / "whole")] == [r["train_loss"] for r in rows(model_run)]


def test_run_directory_layout_and_load(tmp_path, verdict_path):
    out = tmp_path / "run"
    result = pretrain(verdict_path, out, preset="tiny", progress=False, sample_prompt="Every effort",
                      train_config=TrainConfig(max_steps=30, batch_size=8, lr=5e-3, eval_interval=10))
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "train_state.pt",
                                               "metrics.csv", "loss.png"}
    header = next(csv.reader(open(out / "metrics.csv")))
    assert header[:7] == ["step", "epoch", "tokens_seen", "lr", "train_loss", "val_loss", "val_ppl"]
    losses = [float(r["train_loss"]) for r in rows(out)]
    assert losses[-1] < losses[0] - 2.0  # learning, not noise
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["tokenizer"] == "gpt2" and config["model"]["n_embd"] == 32 and config["stage"] == "pretrain"
    model, tok = gptlab.load(out)
    x = torch.tensor([tok.encode("Every effort moves you")])
    assert torch.allclose(model(x), load_run(out)[0](x))
    assert result.val_loss is not None and result.step == 30


def test_lr_schedule_warms_up_then_decays_to_min():
    config = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, config) == pytest.approx(1e-4)
    assert lr_at(9, 100, config) == pytest.approx(1e-3)
    assert lr_at(55, 100, config) == pytest.approx(0.55e-3)
    assert lr_at(100, 100, config) == pytest.approx(1e-4)


def test_weight_decay_only_on_matrices():
    model = GPTModel(GPTConfig.preset("tiny"))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    a = run_tiny(tmp_path / "a", small_config(batch_size=8, max_steps=3, shuffle=False, eval_interval=3), dropout=0.0)
    b = run_tiny(tmp_path / "b", small_config(batch_size=4, grad_accum=2, max_steps=3, shuffle=False,
                                              eval_interval=3), dropout=0.0)
    wa, wb = load_run(tmp_path / "a")[0].state_dict(), load_run(tmp_path / "b")[0].state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert a.tokens_seen == b.tokens_seen == 3 * 8 * 16


def test_checkpoint_write_killed_midway_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_tiny(out, small_config(max_steps=2))
    before = (out / "train_state.pt").read_bytes()

    def dies_midway(obj, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(out, small_config(max_steps=4), resume=True)
    assert (out / "train_state.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_bad_runs_are_clear_errors(tmp_path, verdict_path):
    out = tmp_path / "run"
    with pytest.raises(GptlabError, match="nothing to resume"):
        pretrain(verdict_path, out, preset="tiny", resume=True, progress=False)
    pretrain(verdict_path, out, preset="tiny", progress=False, sample_prompt=None,
             train_config=TrainConfig(max_steps=1))
    with pytest.raises(GptlabError, match="already holds a run; pass --resume"):
        pretrain(verdict_path, out, preset="tiny", progress=False)
    with pytest.raises(GptlabError, match=r"differ from them: --preset demo \(the run has tiny\), --context-length 64"):
        pretrain(verdict_path, out, preset="demo", resume=True, progress=False, context_length=64,
                 train_config={"max_steps": 2})
    with pytest.raises(GptlabError, match="batch_size must be positive|batch-size must be positive"):
        TrainConfig(batch_size=0)
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(GptlabError, match="corrupt weights file"):
        gptlab.load(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(GptlabError, match="no model.safetensors"):
        gptlab.load(out)
