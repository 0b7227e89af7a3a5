"""The house rules: what loads when, one source of defaults, no hidden process-wide state."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

from gptlab import cli
from gptlab.config import (
    INSTRUCT_TRAINING, PRETRAIN_TRAINING, ClassifierSettings, InstructSettings, PretrainSettings, SamplingConfig,
    ServeLimits, TrainConfig, classifier_training, instruct_training,
)
from gptlab.errors import GptlabError


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_import_gptlab_loads_no_torch():
    loaded = _modules_after("import gptlab, gptlab.cli, gptlab.config, gptlab.tokenizer")
    assert "torch" not in loaded and "gptlab.weights" not in loaded


def test_help_of_every_command_loads_no_torch():
    commands = [c.__name__.removeprefix("add_").replace("_", "-") for c in cli.COMMANDS]
    code = ("import contextlib, io\nfrom gptlab.cli import main\n"
            f"for argv in [['--help']] + [[c, '--help'] for c in {commands!r}]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(argv)")
    loaded = _modules_after(code)
    assert "torch" not in loaded and "fastapi" not in loaded and "matplotlib" not in loaded


def test_console_script_help_loads_no_torch():
    # the installed entry point, as a user runs it: -X importtime lists every module imported
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "from gptlab.cli import main; main(['--help'])"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "pretrain" in result.stdout
    assert " torch" not in result.stderr


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_the_library_defaults(capsys):
    text = _help("pretrain", capsys)
    assert f"passes over the training data (default: {PRETRAIN_TRAINING.epochs:g})" in text.replace(".0)", ")")
    assert f"steps between evaluations and checkpoints (none: once per epoch) (default: {PRETRAIN_TRAINING.eval_interval})" in text
    assert f"model size (default: {PretrainSettings.preset})" in text
    text = _help("finetune-instruct", capsys)
    assert f"peak learning rate (default: {INSTRUCT_TRAINING.lr}, {instruct_training(True).lr} with --lora)" in text
    text = _help("finetune-classifier", capsys)
    scratch, pretrained, lora = classifier_training(None), classifier_training("gpt2"), classifier_training("gpt2", True)
    assert f"(default: {scratch.lr} from scratch, {pretrained.lr} with --init, {lora.lr} with --lora)" in text
    text = _help("serve", capsys)
    for f in fields(ServeLimits):
        assert f"(default: {getattr(ServeLimits(), f.name)})" in text
    text = _help("respond", capsys)
    assert "tokens to generate (default: 256)" in text


@pytest.mark.parametrize("cls", [TrainConfig, SamplingConfig, ServeLimits, PretrainSettings, ClassifierSettings,
                                 InstructSettings])
def test_every_documented_setting_is_an_option(cls, capsys):
    parser = cli.build_parser()
    flags = {a for action in parser._subparsers._group_actions[0].choices.values() for act in action._actions
             for a in act.option_strings}
    for f in fields(cls):
        if "help" in f.metadata:
            assert f.metadata.get("flag", "--" + f.name.replace("_", "-")) in flags


def test_unset_options_take_the_stage_defaults():
    args = cli.build_parser().parse_args(["pretrain", "--data", "x", "--out", "y", "--lr", "1e-3"])
    assert cli.given(args, PretrainSettings) == {"data": "x"}
    assert cli.train_config(args, PRETRAIN_TRAINING) == TrainConfig(**{**PRETRAIN_TRAINING.__dict__, "lr": 1e-3})


@pytest.mark.parametrize("bad", [dict(lr=float("nan")), dict(lr=float("inf")), dict(weight_decay=float("nan")),
                                 dict(grad_clip=float("nan")), dict(min_lr_ratio=-2.0), dict(warmup_steps=-3),
                                 dict(betas=(0.9, 1.5))])
def test_train_config_refuses_non_finite_and_out_of_range(bad):
    with pytest.raises(GptlabError):
        TrainConfig(**bad)


def test_train_leaves_malloc_and_matplotlib_alone(tmp_path, monkeypatch, verdict_path):
    import matplotlib

    import gptlab.device
    from gptlab.pretrain import pretrain

    calls = []
    monkeypatch.setattr(gptlab.device, "keep_freed_memory_mapped", lambda: calls.append(1))
    backend = matplotlib.get_backend()
    pretrain(verdict_path, tmp_path / "run", TrainConfig(max_steps=2, eval_interval=1), preset="tiny",
             progress=False, sample_prompt=None)
    assert calls == [] and matplotlib.get_backend() == backend and (tmp_path / "run" / "loss.png").stat().st_size > 0
    assert cli.main(["pretrain", "--data", str(verdict_path), "--out", str(tmp_path / "cli"), "--preset", "tiny",
                     "--max-steps", "1", "--quiet", "--sample-prompt", ""]) == 0
    assert calls == [1]  # the command opts the process in; the library never does


def test_lint_imports_contract_holds():
    lint = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()"], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-2000:]
