"""pytest plugin: run tests as on a torch release that renamed the private oneDNN ops gptlab uses.

    PYTHONPATH=tests python -m pytest -p no_fast_kernels tests/test_model.py tests/test_train.py tests/test_generate.py \
        tests/test_loss.py

(``tests/test_fast_kernels.py`` runs exactly this.) Before any test module imports gptlab,
``torch.ops.mkldnn`` loses ``_linear_pointwise`` and ``_reorder_linear_weight``; every other op stays.
The tests about those kernels themselves are skipped. At the end two lines report the fallback log
line and the kernels ``CPULinear`` chose, for the calling test to check.
"""
from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch

HIDDEN_OPS = ("_linear_pointwise", "_reorder_linear_weight")
# tests that check the oneDNN kernels are chosen: nothing to check where they are gone
NEEDS_FAST_KERNELS = {
    "test_onednn_is_available_on_this_build",
    "test_onednn_training_path_matches_f_linear_values_and_gradients",
    "test_training_on_onednn_gives_the_losses_of_f_linear",
    "test_inference_kernels_decode_like_the_full_forward",
    "test_batched_generation_reads_packed_weights_then_drops_them",
}


class WithoutOps:
    """``torch.ops.mkldnn`` as a torch without the ``hidden`` ops would have it; every other op as it is."""

    def __init__(self, real, hidden: tuple[str, ...] = HIDDEN_OPS) -> None:
        self._real, self._hidden = real, hidden

    def __getattr__(self, name: str):
        if name in self._hidden:  # what torch raises for an op it does not have
            raise AttributeError(f"'_OpNamespace' 'mkldnn' object has no attribute '{name}'")
        return getattr(self._real, name)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "gptlab" and "torch.ops.mkldnn" in record.getMessage():
            self.messages.append(record.getMessage())


_records = _Records()
_kernels: Counter = Counter()


def pytest_configure(config) -> None:
    torch.ops.mkldnn = WithoutOps(torch.ops.mkldnn)
    logging.getLogger("gptlab").addHandler(_records)
    from gptlab.linear import CPULinear  # importing needs no oneDNN op

    real = CPULinear._kernel_for

    def counted(self, x, weight):
        kernel = real(self, x, weight)
        _kernels[kernel] += 1
        return kernel

    CPULinear._kernel_for = counted


def pytest_collection_modifyitems(config, items) -> None:
    skip = pytest.mark.skip(reason="checks the oneDNN kernels, which this run hides")
    for item in items:
        if item.originalname in NEEDS_FAST_KERNELS:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.write_line(f"no_fast_kernels: fallback logged: {_records.messages!r}")
    terminalreporter.write_line(f"no_fast_kernels: CPULinear kernels chosen: {dict(_kernels)!r}")
