"""Never lose work, never surprise (issue 23): bad input is one line before any work, resume restores the run,
stages are checked, nothing is overwritten without consent, and the messages name the fix."""
import csv
import json
import logging
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.model import GPTConfig, GPTModel
from gptlab.run import read_run_config, save_model
from gptlab.weights import load_run
from gptlab.surgery import add_classifier_head
from gptlab.tokenizer import get_tokenizer

DATA = Path(__file__).resolve().parent.parent / "data"
VERDICT = DATA / "the-verdict.txt"
RECORDS = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("yes", "no", "maybe", "so")] * 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A language-model run (with its held-out test.json), a classifier run, and input files."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    save_model(root / "lm", GPTModel(GPTConfig.preset("tiny")), get_tokenizer("gpt2"), {"stage": "pretrain"})
    (root / "lm" / "test.json").write_text(json.dumps(RECORDS))
    classifier = add_classifier_head(GPTModel(GPTConfig.preset("tiny")), 2)
    save_model(root / "clf", classifier, get_tokenizer("gpt2"),
               {"stage": "classifier", "labels": ["ham", "spam"], "classifier": {"max_length": 16}})
    (root / "records.json").write_text(json.dumps(RECORDS))
    (root / "responses.json").write_text(json.dumps([{**r, "model_response": r["output"]} for r in RECORDS]))
    (root / "wrapped.json").write_text(json.dumps({"data": RECORDS}))
    with open(root / "texts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "text"])
        for i in range(20):
            writer.writerow(["spam" if i % 2 else "ham", f"{'win cash now' if i % 2 else 'see you at lunch'} {i}"])
    (root / "folder").mkdir()
    (root / "folder" / "a.txt").write_text("some text")
    return root


def snapshot(*roots) -> dict:
    """Every path below ``roots``, with each file's time and size (a folder's time changes when a writability
    check creates and removes its probe file, which is no change)."""
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None
            for root in roots for p in Path(root).rglob("*")}


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- every number and path checked before any work -----------------------------------------------------

PRETRAIN = ["pretrain", "--data", VERDICT, "--preset", "tiny", "--out", "{tmp}/run", "--quiet"]
CLASSIFIER = ["finetune-classifier", "--data", "{runs}/texts.csv", "--out", "{tmp}/run", "--quiet"]
INSTRUCT = ["finetune-instruct", "--data", "{runs}/records.json", "--preset", "tiny", "--out", "{tmp}/run", "--quiet"]
INSTRUCT_INIT = ["finetune-instruct", "--data", "{runs}/records.json", "--out", "{tmp}/run", "--quiet"]
GENERATE = ["generate", "--model", "{runs}/lm", "--prompt", "hi"]
RESPOND = ["respond", "--model", "{runs}/lm", "--output", "{tmp}/answers.json"]
CLASSIFY = ["classify", "--model", "{runs}/clf"]
JUDGE = ["judge", "--input", "{runs}/responses.json"]
TOKENIZER = ["train-tokenizer", "--input", VERDICT, "--out", "{tmp}/tok"]
EXPORT = ["export", "--format", "hf", "{runs}/lm"]
PREPARE = ["prepare", VERDICT, "--out"]

BAD_INPUTS = [
    # pretrain: the training loop's numbers
    (PRETRAIN + ["--lr", "nan"], "lr must be a finite number, got nan"),
    (PRETRAIN + ["--lr", "inf"], "lr must be a finite number, got inf"),
    (PRETRAIN + ["--lr", "0"], "learning rate must be positive"),
    (PRETRAIN + ["--lr=-1e-3"], "learning rate must be positive"),
    (PRETRAIN + ["--weight-decay", "nan"], "weight-decay must be a finite number"),
    (PRETRAIN + ["--weight-decay", "-0.1"], "weight-decay must be >= 0"),
    (PRETRAIN + ["--grad-clip", "nan"], "grad-clip must be a finite number"),
    (PRETRAIN + ["--grad-clip", "-1"], "grad-clip must be >= 0"),
    (PRETRAIN + ["--min-lr-ratio", "-2"], "min-lr-ratio must be in [0, 1]"),
    (PRETRAIN + ["--min-lr-ratio", "1.5"], "min-lr-ratio must be in [0, 1]"),
    (PRETRAIN + ["--min-lr-ratio", "nan"], "min-lr-ratio must be a finite number"),
    (PRETRAIN + ["--warmup-steps", "-3"], "warmup-steps must be >= 0"),
    (PRETRAIN + ["--epochs", "nan"], "epochs must be a finite number"),
    (PRETRAIN + ["--epochs", "inf"], "epochs must be a finite number"),
    (PRETRAIN + ["--epochs", "0"], "give a positive number of epochs"),
    (PRETRAIN + ["--epochs", "-1"], "give a positive number of epochs"),
    (PRETRAIN + ["--max-steps", "0"], "max-steps must be positive"),
    (PRETRAIN + ["--batch-size", "0"], "batch-size must be positive"),
    (PRETRAIN + ["--grad-accum", "0"], "grad-accum must be positive"),
    (PRETRAIN + ["--eval-interval", "0"], "eval-interval must be positive"),
    (PRETRAIN + ["--log-interval", "-1"], "log-interval must be positive"),
    (PRETRAIN + ["--eval-batches", "0"], "eval-batches must be positive"),
    (PRETRAIN + ["--adam-betas", "1", "0.9"], "adam betas must be two numbers in [0, 1)"),
    (PRETRAIN + ["--adam-betas", "nan", "0.9"], "adam betas must be two numbers in [0, 1)"),
    (PRETRAIN + ["--seed", "-1"], "seed must be between 0 and 2**63 - 1"),
    (PRETRAIN + ["--seed", str(2**64)], "seed must be between 0 and 2**63 - 1"),
    # pretrain: its own settings
    (PRETRAIN + ["--stride", "0"], "stride must be positive"),
    (PRETRAIN + ["--stride", "-1"], "stride must be positive"),
    (PRETRAIN + ["--dropout", "nan"], "dropout must be a finite number"),
    (PRETRAIN + ["--dropout", "1"], "dropout must be in [0, 1)"),
    (PRETRAIN + ["--dropout", "-0.1"], "dropout must be in [0, 1)"),
    (PRETRAIN + ["--val-fraction", "1"], "val-fraction must be in [0, 1)"),
    (PRETRAIN + ["--val-fraction", "nan"], "val-fraction must be in [0, 1)"),
    (PRETRAIN + ["--context-length", "0"], "context_length must be positive"),
    (["pretrain", "--preset", "tiny", "--out", "{tmp}/run"], "give the text to train on (--data"),
    (["pretrain", "--data", "{tmp}/nope.txt", "--out", "{tmp}/run"], "--data {tmp}/nope.txt: no such file or folder"),
    (["pretrain", "--data", VERDICT, "--init", "{runs}/clf", "--out", "{tmp}/run"],
     "is a classifier run (finetune-classifier, labels ham, spam); pretrain needs a language model"),
    (PRETRAIN + ["--resume"], "nothing to resume"),
    # finetune-classifier
    (CLASSIFIER + ["--split", "0.5", "0.5", "0.5"], "split must be three fractions"),
    (CLASSIFIER + ["--split", "nan", "0.5", "0.5"], "split must be three fractions"),
    (CLASSIFIER + ["--split", "-0.2", "0.6", "0.6"], "split must be three fractions"),
    (CLASSIFIER + ["--split", "0", "0.5", "0.5"], "split must be three fractions"),
    (CLASSIFIER + ["--max-length", "0"], "max-length must be positive"),
    (CLASSIFIER + ["--lr", "nan"], "lr must be a finite number"),
    (CLASSIFIER + ["--epochs", "0"], "give a positive number of epochs"),
    (CLASSIFIER + ["--dropout", "nan"], "dropout must be a finite number"),
    (CLASSIFIER + ["--batch-size", "-2"], "batch-size must be positive"),
    (["finetune-classifier", "--out", "{tmp}/run"], "give the labelled texts to train on (--data"),
    (["finetune-classifier", "--data", "{runs}/folder", "--out", "{tmp}/run"], "folder is a folder; give a file"),
    (CLASSIFIER + ["--init", "{runs}/clf"], "finetune-classifier needs a language model"),
    (CLASSIFIER + ["--init", "{runs}/lm", "--drop-head"], "--drop-head: {runs}/lm has no classifier head to drop"),
    # finetune-instruct
    (INSTRUCT + ["--lr", "nan"], "lr must be a finite number"),
    (INSTRUCT + ["--lr", "inf"], "lr must be a finite number"),
    (INSTRUCT + ["--weight-decay", "nan"], "weight-decay must be a finite number"),
    (INSTRUCT + ["--train-fraction", "nan"], "train-fraction must be in [0, 1]"),
    (INSTRUCT + ["--train-fraction", "0"], "train-fraction must be positive"),
    (INSTRUCT + ["--train-fraction", "1.5"], "train-fraction must be in [0, 1]"),
    (INSTRUCT + ["--test-fraction", "-0.1"], "test-fraction must be in [0, 1]"),
    (INSTRUCT + ["--max-length", "1"], "max-length must be at least 2"),
    (INSTRUCT + ["--dropout", "inf"], "dropout must be a finite number"),
    (INSTRUCT_INIT + ["--init", "{runs}/clf"], "finetune-instruct needs a language model"),
    (INSTRUCT_INIT[:2] + ["{runs}/wrapped.json"] + INSTRUCT_INIT[3:] + ["--preset", "tiny"],
     "one JSON object holding the records under 'data', not a list of records"),
    (INSTRUCT_INIT[:2] + ["{runs}/folder"] + INSTRUCT_INIT[3:] + ["--preset", "tiny"], "folder is a folder; give a file"),
    # generate, chat: sampling numbers and the stage
    (GENERATE + ["--temperature", "nan"], "temperature must be"),
    (GENERATE + ["--temperature", "inf"], "temperature must be"),
    (GENERATE + ["--temperature", "-1"], "temperature must be"),
    (GENERATE + ["--top-p", "nan"], "top-p must be in (0, 1]"),
    (GENERATE + ["--top-p", "0"], "top-p must be in (0, 1]"),
    (GENERATE + ["--top-k", "0"], "top-k must be positive"),
    (GENERATE + ["--max-new-tokens", "-1"], "max-new-tokens must be >= 0"),
    (["generate", "--model", "{runs}/clf", "--prompt", "hi"], "clf is a classifier run (finetune-classifier, "
                                                              "labels ham, spam); generate needs a language model"),
    (["chat", "--model", "{runs}/lm", "--temperature", "nan"], "temperature must be"),
    (["chat", "--model", "{runs}/clf"], "chat needs a language model"),
    # respond
    (RESPOND + ["--limit", "-1"], "--limit must be a positive number of records, got -1"),
    (RESPOND + ["--limit", "0"], "--limit must be a positive number of records, got 0"),
    (RESPOND + ["--temperature", "inf"], "temperature must be"),
    (["respond", "--model", "{runs}/clf", "--input", "{runs}/records.json", "--output", "{tmp}/a.json"],
     "respond needs a language model"),
    (["respond", "--model", "{runs}/lm", "--input", "{runs}/records.json", "--output", "{runs}/records.json"],
     "is also the input"),
    (["respond", "--model", "{runs}/lm", "--output", "{runs}/lm/test.json"], "is also the input"),
    (["respond", "--model", "{runs}/lm", "--input", "{runs}/records.json", "--output", "{runs}/lm/test.json"],
     "lm/test.json is a file of the run"),
    (["respond", "--model", "{runs}/lm", "--input", "{runs}/records.json", "--output", "{runs}/lm/model.safetensors"],
     "is a file of the run"),
    (["respond", "--model", "{runs}/lm", "--output", "{tmp}"], "is a folder; give a file name"),
    (["respond", "--model", "{tmp}/no-model", "--input", "{runs}/records.json", "--output", "/proc/answers.json"],
     "cannot create files in /proc"),  # checked before the model is even read
    (["respond", "--model", "{runs}/lm", "--input", "{runs}/folder", "--output", "{tmp}/a.json"],
     "folder is a folder; give a file"),
    (["respond", "--model", "{runs}/lm", "--input", "{runs}/wrapped.json", "--output", "{tmp}/a.json"],
     "one JSON object holding the records under 'data'"),
    # classify
    (CLASSIFY + ["--batch-size", "0", "hi"], "batch-size must be positive"),
    (CLASSIFY + ["--batch-size", "-1", "hi"], "batch-size must be positive"),
    (CLASSIFY + ["--input", "{runs}/texts.csv", "--output", "{runs}/texts.csv"], "is also the input"),
    (CLASSIFY + ["--input", "{runs}/texts.csv", "--output", "{runs}/clf/config.json"], "is a file of the run"),
    (CLASSIFY + ["--input", "{runs}/folder"], "folder is a folder; give a file"),
    (["classify", "--model", "{runs}/lm", "hi"], "not a classifier run"),
    # judge
    (JUDGE + ["--timeout", "0"], "--timeout must be a positive number of seconds"),
    (JUDGE + ["--timeout", "nan"], "--timeout must be a positive number of seconds"),
    (JUDGE + ["--timeout", "inf"], "--timeout must be a positive number of seconds"),
    (JUDGE + ["--timeout", "-1"], "--timeout must be a positive number of seconds"),
    (JUDGE + ["--retries", "-1"], "--retries must be >= 0"),
    (JUDGE + ["--max-tokens", "0"], "--max-tokens must be positive"),
    (JUDGE + ["--base-url", "not-a-url"], "--base-url 'not-a-url' is not an http(s) URL with a host"),
    (JUDGE + ["--base-url", "ftp://example.com/v1"], "is not an http(s) URL with a host"),
    (JUDGE + ["--base-url", "http://"], "is not an http(s) URL with a host"),
    (JUDGE + ["--base-url", "http://host:port/v1"], "is not an http(s) URL with a host"),
    (JUDGE + ["--output", "{runs}/responses.json"], "is also the input"),
    (JUDGE + ["--output", "{runs}/lm/val.json"], "is a file of the run"),
    (JUDGE + ["--offline", "--output", "{runs}/lm/config.json"], "is a file of the run"),
    (["judge", "--input", "{runs}/folder", "--offline"], "folder is a folder; give a file"),
    # train-tokenizer
    (TOKENIZER + ["--vocab-size", "0"], "vocabulary size 0 is below 256 bytes"),
    (TOKENIZER + ["--vocab-size", "-5"], "vocabulary size -5 is below 256 bytes"),
    (TOKENIZER + ["--vocab-size", "100"], "vocabulary size 100 is below 256 bytes"),
    (["train-tokenizer", "--input", "{runs}/folder", "--out", "{tmp}/tok", "--vocab-size", "300"], "is a folder"),
    (["train-tokenizer", "--input", VERDICT, "--out", "{runs}/records.json", "--vocab-size", "300"], "is a file"),
    # export
    (EXPORT + ["{runs}"], "is not empty; pass --overwrite"),
    (EXPORT + ["{runs}/lm"], "is where the model is read from"),
    (EXPORT + ["{runs}/lm", "--overwrite"], "is where the model is read from"),
    (["export", "--format", "hf", "{runs}/lm/model.safetensors", "{runs}/lm", "--overwrite"],
     "is where the model is read from"),
    # prepare
    (PREPARE + [VERDICT], "is also the input"),
    (PREPARE + ["/proc/verdict.tokens"], "cannot create files in /proc"),
    (PREPARE + ["{tmp}"], "is a folder; give a file name"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=lambda x: " ".join(map(str, x[:1] + x[-2:]))
                         if isinstance(x, list) else None)
def test_bad_input_is_one_line_before_any_work(runs, tmp_path, capsys, argv, message):
    fill = {"tmp": tmp_path, "runs": runs}
    argv = [str(a).format(**fill) for a in argv]
    before = snapshot(runs, tmp_path)
    code, out, err = run_cli(argv, capsys)
    assert code == 2, err
    assert message.format(**fill) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert out == ""
    assert snapshot(runs, tmp_path) == before  # nothing written, nothing changed, no output folder


def test_the_count_of_bad_inputs():
    commands = {argv[0] for argv, _ in BAD_INPUTS}
    assert len(BAD_INPUTS) == 117 and len(commands) == 11  # every subcommand but serve (tests/test_serve.py)


# ---- resume restores the run -------------------------------------------------------------------------

def pretrain_args(out, *extra, data=VERDICT):
    return ["pretrain", "--data", data, "--preset", "tiny", "--out", out, "--quiet", "--sample-prompt", "", *extra]


def metrics(out):
    with open(Path(out) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


START = ["--batch-size", "4", "--grad-accum", "2", "--lr", "6e-4", "--warmup-steps", "2", "--eval-interval", "2",
         "--max-steps", "4", "--dropout", "0.1"]


def test_resume_replays_the_runs_settings_and_refuses_changes(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(pretrain_args(out, *START), capsys)[0] == 0
    stored = read_run_config(out)
    state_before = (out / "train_state.pt").read_bytes()

    code, _, err = run_cli(pretrain_args(out, "--lr", "1e-3", "--batch-size", "8", "--resume"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "these differ from them: --batch-size 8 (the run has 4), --lr 0.001 (the run has 0.0006)" in err
    code, _, err = run_cli(pretrain_args(out, "--preset", "mini", "--stride", "8", "--resume"), capsys)
    assert code == 2 and "--preset mini (the run has tiny), --stride 8 (the run has none)" in err
    code, _, err = run_cli(pretrain_args(out, "--max-steps", "3", "--resume"), capsys)
    assert code == 2 and "started for 4 steps" in err
    assert (out / "train_state.pt").read_bytes() == state_before  # a refused resume touches nothing

    # the README's line: only what changes is given; --data may be left out (the run's own is used)
    code, out_text, _ = run_cli(["pretrain", "--out", out, "--max-steps", "6", "--resume", "--quiet"], capsys)
    assert code == 0 and "done: step 6" in out_text
    after = read_run_config(out)
    for name in ("batch_size", "grad_accum", "lr", "warmup_steps", "eval_interval", "seed", "betas"):
        assert after["train"][name] == stored["train"][name], name
    assert after["train"]["max_steps"] == 6 and after["train"]["schedule_steps"] == 4
    assert after["pretrain"] == stored["pretrain"] and after["data_fingerprint"] == stored["data_fingerprint"]
    epochs = [float(r["epoch"]) for r in metrics(out)]
    assert epochs == sorted(epochs) and [r["step"] for r in metrics(out)] == ["2", "4", "6"]


def test_a_longer_resume_trains_on_at_the_final_lr_and_stays_exact(tmp_path, capsys):
    import shutil

    straight, again = tmp_path / "straight", tmp_path / "again"
    assert run_cli(pretrain_args(straight, *START), capsys)[0] == 0
    shutil.copytree(straight, again)  # the same run at step 4
    assert run_cli(pretrain_args(straight, "--max-steps", "8", "--resume"), capsys)[0] == 0
    lrs = {int(r["step"]): float(r["lr"]) for r in metrics(straight)}
    final = 6e-4 * 0.1  # lr x min-lr-ratio, where the cosine of the run's 4 planned steps ends
    assert lrs[2] > lrs[4] > final  # a row shows the lr of its last step: step 4's is mid-cosine
    assert lrs[6] == lrs[8] == pytest.approx(final, rel=1e-3)

    # extended in two resumes: the same numbers as in one
    assert run_cli(pretrain_args(again, "--max-steps", "6", "--resume"), capsys)[0] == 0
    assert run_cli(pretrain_args(again, "--max-steps", "8", "--resume"), capsys)[0] == 0
    assert [(r["step"], r["lr"], r["train_loss"], r["val_loss"]) for r in metrics(again)] == \
        [(r["step"], r["lr"], r["train_loss"], r["val_loss"]) for r in metrics(straight)]


def test_resume_checks_the_data_by_its_fingerprint(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(VERDICT.read_text())
    out = tmp_path / "run"
    assert run_cli(pretrain_args(out, "--max-steps", "1", data=data), capsys)[0] == 0
    other = tmp_path / "other.txt"
    other.write_text(VERDICT.read_text()[:-200])
    code, _, err = run_cli(pretrain_args(out, "--max-steps", "2", "--resume", data=other), capsys)
    assert code == 2 and f"--data {other} (not the data the run trained on" in err

    moved = tmp_path / "moved.txt"  # the same contents elsewhere: fine
    data.rename(moved)
    assert run_cli(pretrain_args(out, "--max-steps", "2", "--resume", data=moved), capsys)[0] == 0
    assert read_run_config(out)["data_fingerprint"]["path"] == str(moved)
    moved.write_text(VERDICT.read_text() + "more")  # changed in place, not given: refused too
    code, _, err = run_cli(["pretrain", "--out", out, "--max-steps", "3", "--resume", "--quiet"], capsys)
    assert code == 2 and f"{moved}: changed since the run started" in err


def test_every_stage_replays_through_the_python_api(runs, tmp_path):
    from gptlab.finetune.classifier import finetune_classifier
    from gptlab.finetune.instruct import finetune_instruct
    from gptlab.pretrain import pretrain

    out = tmp_path / "lm"
    pretrain(VERDICT, out, {"max_steps": 1, "eval_interval": 1, "batch_size": 2}, preset="tiny", sample_prompt=None,
             progress=False)
    with pytest.raises(GptlabError, match=r"--batch-size 4 \(the run has 2\)"):
        pretrain(None, out, {"batch_size": 4}, resume=True, progress=False)
    assert pretrain(None, out, {"max_steps": 2}, resume=True, progress=False).step == 2

    out = tmp_path / "clf"
    finetune_classifier(runs / "texts.csv", out, {"max_steps": 1, "eval_interval": 1, "device": "cpu"},
                        progress=False)
    with pytest.raises(GptlabError, match=r"--balance on \(the run has off\)"):
        finetune_classifier(None, out, resume=True, balance=True, progress=False)
    # "auto" resolves as the run stored it: naming the same choice is no difference
    assert finetune_classifier(None, out, {"max_steps": 2}, resume=True, trainable="auto",
                               progress=False).train.step == 2

    out = tmp_path / "instruct"
    finetune_instruct(runs / "records.json", out, {"max_steps": 1, "eval_interval": 1, "batch_size": 4,
                                                   "device": "cpu"}, preset="tiny", prompt_style="phi3",
                      progress=False)
    with pytest.raises(GptlabError, match=r"--prompt-style alpaca \(the run has phi3\)"):
        finetune_instruct(None, out, resume=True, prompt_style="alpaca", progress=False)
    with pytest.raises(GptlabError, match="not one of finetune-classifier"):
        finetune_classifier(None, out, resume=True, progress=False)
    assert finetune_instruct(None, out, {"max_steps": 2}, resume=True, progress=False).step == 2
    assert json.loads((out / "test.json").read_text()) == RECORDS[10:11]


def test_tokens_per_second_after_a_resume_count_this_run_only(tmp_path, caplog):
    from gptlab.pretrain import pretrain

    out = tmp_path / "run"
    config = {"max_steps": 2, "eval_interval": 1, "batch_size": 2}
    pretrain(VERDICT, out, config, preset="tiny", sample_prompt=None, progress=False)
    with caplog.at_level(logging.INFO, logger="gptlab"):
        result = pretrain(None, out, {"max_steps": 3}, resume=True, progress=False)
    assert result.tokens_seen == 3 * 2 * 64
    assert "finished after 3 steps, 128 tokens in this run" in caplog.text  # one step of 2 x 64 tokens


# ---- stages are checked ------------------------------------------------------------------------------

def test_drop_head_takes_a_classifiers_backbone_with_a_new_head(runs, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli([str(a).format(runs=runs) for a in CLASSIFIER[:4]] + [out, "--init", runs / "clf", "--drop-head", "--max-steps", "1",
                                             "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    source, tuned = load_run(runs / "clf")[0].state_dict(), load_run(out)[0].state_dict()
    assert torch.equal(source["h.0.attn.c_attn.weight"], tuned["h.0.attn.c_attn.weight"])  # the frozen backbone
    assert not torch.equal(source["lm_head.weight"], tuned["lm_head.weight"])  # a new head
    assert read_run_config(out)["classifier"]["drop_head"] is True


# ---- nothing overwritten without consent -------------------------------------------------------------

def test_export_into_a_used_folder_needs_overwrite(runs, tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "README.md").write_text("mine")
    (folder / "pytorch_model.bin").write_bytes(b"an older model a loader would read")
    assert run_cli(["export", "--format", "hf", runs / "lm", folder], capsys)[0] == 2
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "pytorch_model.bin"]
    assert run_cli(["export", "--format", "hf", runs / "lm", folder, "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    import gptlab

    model, _ = gptlab.load(folder)
    assert torch.equal(model.state_dict()["wte.weight"], load_run(runs / "lm")[0].state_dict()["wte.weight"])


# ---- nothing half-written, nothing left behind -------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["pretrain", "--data", VERDICT, "--init", "{tmp}/no-such-model", "--out", "{tmp}/run"], "cannot load"),
    (["finetune-classifier", "--data", "{tmp}/one-class.csv", "--preset", "tiny", "--out", "{tmp}/run"],
     "only one class"),
    (["finetune-instruct", "--data", "{runs}/records.json", "--init", "{tmp}/no-such-model", "--out", "{tmp}/run"],
     "cannot load"),
    (["finetune-instruct", "--data", "{runs}/records.json", "--preset", "tiny", "--device", "tpu", "--out",
      "{tmp}/run"], "unknown device 'tpu'"),
])
def test_a_failed_start_leaves_no_output_folder(runs, tmp_path, capsys, argv, message):
    (tmp_path / "one-class.csv").write_text("label,text\nham,a\nham,b\nham,c\n")
    code, _, err = run_cli([str(a).format(tmp=tmp_path, runs=runs) for a in argv], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(pretrain_args(out, "--lr", "1e30", "--max-steps", "5", "--eval-interval", "2",
                                         "--grad-clip", "0"), capsys)
    assert code == 2 and "training diverged" in err and "no checkpoint was written yet" in err
    assert not (out / "model.safetensors").exists()  # lost weights are never saved

    from gptlab.data import TokenWindowDataset
    from gptlab.train import TrainConfig, lm_loss, train

    calls = []

    def nan_after_four_steps(model, batch):  # a loss that turns NaN after the step-4 checkpoint
        calls.append(1)
        loss = lm_loss(model, batch)
        return loss * float("nan") if len(calls) > 4 else loss

    tokens = torch.randint(0, 50, (600,)).numpy()
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=50, context_length=16))
    with pytest.raises(GptlabError, match=r"training diverged: the mean training loss up to step 6 is nan; "
                                          r"the last intact checkpoint is step 4"):
        train(model, get_tokenizer("gpt2"), TokenWindowDataset(tokens, 16, 16), None, tmp_path / "api",
              TrainConfig(max_steps=10, eval_interval=2, batch_size=4, device="cpu"), loss_fn=nan_after_four_steps,
              progress=False)
    weights = load_run(tmp_path / "api")[0].state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())


# ---- messages ----------------------------------------------------------------------------------------

class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "a pickle with code", "empty"])
def test_a_corrupt_training_state_is_one_line_without_unsafe_advice(tmp_path, capsys, kind):
    out = tmp_path / "run"
    assert run_cli(pretrain_args(out, "--max-steps", "1"), capsys)[0] == 0
    state = out / "train_state.pt"
    marker = tmp_path / "pwned"
    if kind == "garbage":
        state.write_bytes(b"not a checkpoint at all")
    elif kind == "truncated":
        state.write_bytes(state.read_bytes()[:1000])
    elif kind == "empty":
        state.write_bytes(b"")
    else:
        torch.save({"state": {}, "model": _Exploit(marker)}, state)
    code, _, err = run_cli(pretrain_args(out, "--max-steps", "2", "--resume"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{state}:" in err and "start the run over with --overwrite" in err
    assert "weights_only" not in err and "safe_globals" not in err and not marker.exists()


def test_a_vocabulary_size_the_text_cannot_reach_is_reported(tmp_path, capsys, caplog):
    text = tmp_path / "small.txt"
    text.write_text("hello world, hello there")
    with caplog.at_level(logging.WARNING, logger="gptlab"):
        code, out, _ = run_cli(["train-tokenizer", "--input", text, "--vocab-size", "100000", "--out", tmp_path / "tok",
                                "--quiet"], capsys)
    err = caplog.text
    assert code == 0
    assert "vocabulary size 100000 not reached" in err and "so the tokenizer has" in err
    got = int(err.split("so the tokenizer has ")[1].split(" tokens")[0])
    assert f"{got:,} tokens" in out and got < 300


def test_judge_asks_for_a_bounded_reply(runs, tmp_path, capsys):
    bodies = []

    class Judge(BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            reply = json.dumps({"choices": [{"message": {"content": "85"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        base = ["judge", "--input", runs / "responses.json", "--base-url", url, "--quiet"]
        assert run_cli([*base, "--output", tmp_path / "a.json"], capsys)[0] == 0
        assert run_cli([*base, "--output", tmp_path / "b.json", "--max-tokens", "7"], capsys)[0] == 0
    finally:
        server.shutdown()
    assert {b["max_tokens"] for b in bodies[:4]} == {256} and {b["max_tokens"] for b in bodies[-4:]} == {7}
    assert (tmp_path / "a.cache.jsonl").is_file() and (tmp_path / "a.png").is_file()  # the cache's real name
    assert not math.isnan(json.loads((tmp_path / "a.json").read_text())[0]["judge_score"])


def test_umask_is_followed_by_every_output(runs, tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        assert run_cli(["respond", "--model", runs / "lm", "--input", runs / "records.json", "--output",
                        tmp_path / "a.json", "--max-new-tokens", "1", "--limit", "1", "--quiet"], capsys)[0] == 0
        assert run_cli(["export", "--format", "hf", runs / "lm", tmp_path / "hf"], capsys)[0] == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()} == {0o644}


def test_sigterm_outside_training_exits_143_and_leaves_no_temporary_file(runs, tmp_path, capsys, monkeypatch):
    import signal
    import time

    write_text = Path.write_text

    def terminated_mid_write(self, text, *args, **kwargs):  # SIGTERM arrives while the answers are written
        write_text(self, text[:10], *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(Path, "write_text", terminated_mid_write)
    code, _, err = run_cli(["respond", "--model", runs / "lm", "--input", runs / "records.json", "--output",
                            tmp_path / "a.json", "--max-new-tokens", "1", "--limit", "1", "--quiet"], capsys)
    assert code == 143 and "SIGTERM: stopped" in err
    assert list(tmp_path.iterdir()) == []  # the half-written temporary file was removed on the way out
    assert signal.getsignal(signal.SIGTERM) is before
