from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"


@pytest.fixture
def verdict_path() -> Path:
    return DATA / "the-verdict.txt"


@pytest.fixture(scope="module")
def tiny_lm_run(tmp_path_factory) -> Path:
    """A run directory holding a random-weight tiny language model with GPT-2's tokenizer."""
    from gptlab.model import GPTConfig, GPTModel
    from gptlab.run import save_model
    from gptlab.tokenizer import GPT2Tokenizer

    run = tmp_path_factory.mktemp("tiny-lm") / "tiny-lm"
    torch.manual_seed(0)
    save_model(run, GPTModel(GPTConfig.preset("tiny")), GPT2Tokenizer(), {"prompt_style": "alpaca"})
    return run


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where a CUDA GPU is; elsewhere they are reported as skipped, with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs the cuda-marked tests)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
