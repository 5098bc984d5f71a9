import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; excluded from the default run (reason given per test)")


@pytest.fixture(scope="session")
def dist_cpu():
    """torch.distributed (gloo, one process) and SAT's model-parallel state, as SAT's model code needs them."""
    from sat_cogvideo.distributed import init_distributed

    return init_distributed(device="cpu")


@pytest.fixture(scope="session")
def repo_root():
    return ROOT
