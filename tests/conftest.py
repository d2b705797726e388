"""Test-wide settings: offline, deterministic, CPU-friendly."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the suite pins fp32 numbers (parity, golden images); sampling would otherwise default to bf16 on
# a CPU with AMX / AVX512-BF16. tests/engine/test_precision.py tests that default itself.
os.environ.setdefault("LDM_PRECISION", "full")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# helpers only the tests use (tiny models, toy data, checkpoint builders) live in tests/fixtures/
sys.path.insert(0, str(Path(__file__).parent / "fixtures"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny tensors: avoids OpenMP spin-waiting on a busy
    2-core machine); the previous count is restored afterwards. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def diffusers():
    """diffusers, the test-time reference (the `test` extra): only the tests that compare with it
    take this fixture, so they alone skip where it is missing."""
    return pytest.importorskip("diffusers")


@pytest.fixture(scope="session")
def single_file_utils(diffusers):
    """diffusers' single-file converters (the reference key maps)."""
    return pytest.importorskip("diffusers.loaders.single_file_utils")
