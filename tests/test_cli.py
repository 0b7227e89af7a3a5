import re
import subprocess
import sys

import pytest

from gptlab.cli import main


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prepare_pretrain_generate(tmp_path, capsys, verdict_path):
    tokens = tmp_path / "verdict.tokens"
    code, out, _ = run(["prepare", str(verdict_path), "--out", str(tokens)], capsys)
    assert code == 0 and "5,145 tokens (uint16)" in out
    run_dir = tmp_path / "run"
    code, out, _ = run(["pretrain", "--data", str(tokens), "--preset", "tiny", "--out", str(run_dir), "--max-steps", "6",
                        "--eval-interval", "3", "--quiet", "--sample-prompt", ""], capsys)
    assert code == 0 and "done: step 6" in out
    code, out, _ = run(["pretrain", "--data", str(tokens), "--preset", "tiny", "--out", str(run_dir), "--max-steps", "8",
                        "--eval-interval", "3", "--quiet", "--resume"], capsys)
    assert code == 0 and "done: step 8" in out
    code, out, _ = run(["generate", "--model", str(run_dir), "--prompt", "Every effort moves you",
                        "--max-new-tokens", "5", "--device", "cpu"], capsys)
    assert code == 0 and out.startswith("Every effort moves you") and len(out) > len("Every effort moves you\n")


@pytest.mark.parametrize("make_input,args,message", [
    (lambda p: None, ["--preset", "tiny"], "no such file or folder"),
    (lambda p: p.write_text(""), ["--preset", "tiny"], "no text to train on"),
    (lambda p: p.write_bytes(b"ok\n\xff\xfe"), ["--preset", "tiny"], "not UTF-8 text (invalid byte 0xff at byte offset 3)"),
    (lambda p: p.write_text("too short"), ["--preset", "tiny"], "is 2 tokens long; one training window needs"),
    (lambda p: p.write_text("x " * 500), ["--preset", "tiny", "--batch-size", "0"], "batch-size must be positive"),
    (lambda p: p.write_text("x " * 500), ["--preset", "tiny", "--stride", "-1"], "must be positive"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, make_input, args, message):
    data = tmp_path / "in.txt"
    make_input(data)
    code, _, err = run(["pretrain", "--data", str(data), "--out", str(tmp_path / "run"), "--quiet", *args], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # a run that never started leaves no directory behind


@pytest.mark.parametrize("out", ["a-file", "a-file/run"])
def test_out_through_a_file_is_one_clear_line(tmp_path, capsys, verdict_path, out):
    (tmp_path / "a-file").write_text("not a directory")
    code, _, err = run(["pretrain", "--data", str(verdict_path), "--out", str(tmp_path / out), "--preset", "tiny",
                        "--quiet"], capsys)
    assert code == 2 and "a-file is a file, not a directory; choose another --out" in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_preset_lists_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--data", "x", "--out", str(tmp_path), "--preset", "gpt5"])
    assert exit_info.value.code == 2
    assert "gpt2-small" in capsys.readouterr().err


def test_missing_run_directory(tmp_path, capsys):
    code, _, err = run(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"], capsys)
    assert code == 2 and "cannot load" in err


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"], ["respond", "--output", "out.json"]])
@pytest.mark.parametrize("bad,message", [(["--temperature", "-1"], "temperature must be >= 0"),
                                         (["--top-p", "1.5"], "top-p must be in (0, 1]"),
                                         (["--top-k", "0"], "top-k must be positive")])
def test_bad_sampling_fails_before_loading_or_printing(tmp_path, capsys, command, bad, message):
    # the model does not exist: the sampling error must come first, and nothing goes to stdout
    code, out, err = run([command[0], "--model", str(tmp_path / "nope"), *command[1:], *bad], capsys)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "gptlab.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("prepare", "pretrain", "generate"):
        assert command in out
    out = subprocess.run([sys.executable, "-m", "gptlab.cli", "pretrain", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--resume" in out and "--grad-accum" in out


def test_option_prefixes_are_not_guessed(tmp_path, capsys):
    # with argparse's default prefix matching, `--text` would silently become `--text-column`
    with pytest.raises(SystemExit) as exit_info:
        main(["classify", "--model", str(tmp_path), "--text", "hi"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --text" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["prepare", "{verdict}", "--out", "{tmp}/a-file/verdict.tokens"],
    ["export", "--format", "hf", "{tmp}/run", "{tmp}/a-file"],
])
def test_output_blocked_by_a_file_is_one_clear_line(tmp_path, capsys, verdict_path, args):
    from gptlab.model import GPTConfig, GPTModel
    from gptlab.run import save_model
    from gptlab.tokenizer import get_tokenizer

    save_model(tmp_path / "run", GPTModel(GPTConfig.preset("tiny", vocab_size=50257)), get_tokenizer("gpt2"))
    (tmp_path / "a-file").write_text("not a directory")
    code, _, err = run([a.format(tmp=tmp_path, verdict=verdict_path) for a in args], capsys)
    assert code == 2 and "a-file: a file stands where a directory has to be created" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name,gpus,message", [
    ("tpu", 0, "unknown device 'tpu'"),
    ("cuda", 0, "device 'cuda' requested but no CUDA GPU is available"),
    ("cuda:7", 2, "device 'cuda:7' requested but there are 2 CUDA GPU(s)"),
    ("mps", 0, "device 'mps' requested but Apple's MPS is not available"),
])
def test_unavailable_device_is_a_clear_error(name, gpus, message, monkeypatch):
    import torch

    from gptlab.errors import GptlabError
    from gptlab.device import select_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)  # as on this CPU machine, everywhere
    with pytest.raises(GptlabError, match=re.escape(message)):
        select_device(name)
