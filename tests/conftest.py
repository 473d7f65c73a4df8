import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Deterministic RNG and single-threaded CPU kernels for every test."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
