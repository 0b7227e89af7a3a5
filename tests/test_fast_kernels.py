"""The fast CPU kernels are found on first use and checked; where one is missing or wrong, F.linear runs.

``gptlab.linear`` reaches oneDNN through private torch ops that a torch release may rename: these tests
take them away (or break them) and check that gptlab imports, falls back with one log line, and that
the model, training and generation tests still pass.
"""
import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gptlab.linear
from gptlab.linear import CPULinear, onednn_kernels, packed_weights
from no_fast_kernels import WithoutOps

TESTS = Path(__file__).resolve().parent
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available() or not gptlab.linear.ONEDNN_WANTED,
                                  reason="this torch has no oneDNN, or GPTLAB_ONEDNN=0")


@pytest.fixture
def fresh_lookup(monkeypatch, caplog):
    """The next use looks the ops up again; the lookup of this process comes back afterwards."""
    monkeypatch.setattr(gptlab.linear, "_found", None)
    caplog.set_level(logging.INFO, logger="gptlab")
    return caplog


def fallback_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gptlab"]


def output_and_grads(forward, x: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """``forward(x)`` and the gradients of its sum with respect to ``x`` and ``params``."""
    x = x.detach().requires_grad_()
    out = forward(x)
    return [out.detach(), *torch.autograd.grad(out.sum(), [x, *params])]


@needs_onednn
def test_the_ops_are_found_checked_and_used(fresh_lookup):
    with torch.inference_mode():  # the first use may come from anywhere: the check still runs with gradients
        found = onednn_kernels()
    assert found.linear is not None and found.reorder is not None
    assert CPULinear.use_onednn and fallback_lines(fresh_lookup) == []


@needs_onednn
def test_the_check_leaves_the_global_random_stream_alone(fresh_lookup):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    onednn_kernels()
    assert torch.equal(torch.rand(3), expected)  # a seeded run draws the same numbers with or without it


@needs_onednn
@pytest.mark.parametrize("hidden", [("_linear_pointwise",), ("_linear_pointwise", "_reorder_linear_weight")])
def test_a_missing_linear_op_falls_back_to_f_linear_with_one_log_line(hidden, fresh_lookup, monkeypatch):
    monkeypatch.setattr(torch.ops, "mkldnn", WithoutOps(torch.ops.mkldnn, hidden))
    layer = CPULinear(8, 6)
    x = torch.randn(4, 8)
    kernels = []
    real = CPULinear._kernel_for
    monkeypatch.setattr(CPULinear, "_kernel_for", lambda self, *a: kernels.append(real(self, *a)) or kernels[-1])
    params = [layer.weight, layer.bias]
    fast = output_and_grads(layer, x, params)  # with gradients: where oneDNN would train
    with torch.no_grad(), packed_weights(torch.nn.Sequential(layer), rows=4):
        assert layer.packed is None  # nothing to pack with
        many = layer(x)  # several rows: where oneDNN would infer
    assert kernels == ["torch", "torch"] and not CPULinear.use_onednn
    ref = output_and_grads(lambda t: F.linear(t, layer.weight, layer.bias), x, params)
    for a, b in zip(fast + [many], ref + [ref[0]]):
        torch.testing.assert_close(a, b)
    lines = fallback_lines(fresh_lookup)
    assert len(lines) == 1 and "torch.ops.mkldnn._linear_pointwise is missing" in lines[0] and "F.linear" in lines[0]


@needs_onednn
def test_a_missing_packing_op_keeps_the_linear_and_skips_packing(fresh_lookup, monkeypatch):
    monkeypatch.setattr(torch.ops, "mkldnn", WithoutOps(torch.ops.mkldnn, ("_reorder_linear_weight",)))
    layer = CPULinear(8, 6)
    with torch.no_grad(), packed_weights(torch.nn.Sequential(layer), rows=3):
        assert layer.packed is None
        out = layer(torch.randn(3, 1, 8))
    assert CPULinear.use_onednn and onednn_kernels().reorder is None
    assert out.shape == (3, 1, 6)
    lines = fallback_lines(fresh_lookup)
    assert len(lines) == 1 and "_reorder_linear_weight is missing" in lines[0] and "unpacked" in lines[0]


class ChangedOps(WithoutOps):
    """A torch whose ``_linear_pointwise`` kept its name but changed: other results, or another signature."""

    def __init__(self, real, how: str) -> None:
        super().__init__(real, ())
        self.how = how

    def __getattr__(self, name: str):
        op = super().__getattr__(name)
        if name != "_linear_pointwise":
            return op
        if self.how == "signature":
            def changed(x, w, b, *rest):
                raise TypeError("_linear_pointwise() takes 3 positional arguments but 6 were given")
        elif self.how == "strides":  # right for contiguous weights, wrong for the transposed ones backward passes
            def changed(x, w, b, *rest):
                return op(x, w.as_strided(w.shape, (w.size(1), 1)), b, *rest)
        else:  # "values": right shape, wrong numbers
            def changed(x, w, b, *rest):
                return op(x, w, b, *rest) * 1.01
        return changed


@needs_onednn
@pytest.mark.parametrize("how", ["signature", "values", "strides"])
def test_a_changed_linear_op_is_refused(how, fresh_lookup, monkeypatch):
    monkeypatch.setattr(torch.ops, "mkldnn", ChangedOps(torch.ops.mkldnn, how))
    assert not CPULinear.use_onednn
    lines = fallback_lines(fresh_lookup)
    assert len(lines) == 1 and "torch.ops.mkldnn._linear_pointwise does not work as expected" in lines[0]


def test_gptlab_onednn_0_opts_out_without_a_lookup(fresh_lookup, monkeypatch):
    monkeypatch.setattr(gptlab.linear, "ONEDNN_WANTED", False)  # what GPTLAB_ONEDNN=0 sets at import
    monkeypatch.setattr(torch.ops, "mkldnn", WithoutOps(torch.ops.mkldnn))
    assert not CPULinear.use_onednn and gptlab.linear._found is None  # not looked up, so nothing to log
    assert fallback_lines(fresh_lookup) == []


def test_gptlab_imports_and_runs_when_torch_ops_mkldnn_is_gone():
    """Every lookup raising, as if the namespace were gone: importing and running gptlab does not touch it."""
    code = """if True:
        import logging, torch
        class Gone:
            def __getattr__(self, name):
                raise AttributeError(name)
        torch.ops.mkldnn = Gone()
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        import gptlab, gptlab.linear, gptlab.model, gptlab.train, gptlab.generate
        from gptlab.model import GPTConfig, GPTModel
        model = GPTModel(GPTConfig.preset("tiny", vocab_size=50))
        ids = torch.randint(0, 50, (2, 9))
        model(ids[:, :-1], targets=ids[:, 1:]).backward()
        print(gptlab.generate.generate(model.eval(), ids[:, :3], 4).shape)
    """
    env = {k: v for k, v in os.environ.items() if k != "GPTLAB_ONEDNN"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "torch.Size([2, 7])"
    if torch.backends.mkldnn.is_available():
        assert out.stderr.count("torch.ops.mkldnn._linear_pointwise is missing") == 1, out.stderr


def test_model_training_and_generation_tests_pass_without_the_fast_kernels():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    env.pop("GPTLAB_ONEDNN", None)
    cmd = [sys.executable, "-m", "pytest", "-p", "no_fast_kernels", "-p", "no:cacheprovider", "-q",
           "tests/test_model.py", "tests/test_train.py", "tests/test_generate.py", "tests/test_loss.py"]
    out = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    report = {line.split(": ", 2)[1]: line.split(": ", 2)[2] for line in out.stdout.splitlines()
              if line.startswith("no_fast_kernels: ")}
    kernels = ast.literal_eval(report["CPULinear kernels chosen"])
    assert kernels.get("torch", 0) > 1000 and not {"onednn", "onednn_autograd"} & kernels.keys(), kernels
    if torch.backends.mkldnn.is_available():
        logged = ast.literal_eval(report["fallback logged"])
        assert len(logged) == 1 and "torch.ops.mkldnn._linear_pointwise is missing" in logged[0], logged
