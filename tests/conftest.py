from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"


@pytest.fixture
def verdict_path() -> Path:
    return DATA / "the-verdict.txt"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
