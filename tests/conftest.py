import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import demo_paths, finetune_sh_run, tiny_sat_folder  # noqa: E402,F401  (fixtures, for every module)

pytest_plugins = ["pytester"]

# The variables through which the code finds its cache: a test run uses a fresh cache of its own (under pytest's
# base temp folder) and never ~/.cache/sat-cogvideo; a test that changes them does not change them for the next.
CACHE_VARS = ("SAT_COGVIDEO_CACHE", "SAT_COGVIDEO_DEMO")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; excluded from the default run (reason given per test)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one (run them: pytest -m cuda)")


def pytest_collection_modifyitems(config, items):
    """``cuda``-marked tests are skipped, with the reason, where no CUDA GPU is visible."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """``$SAT_COGVIDEO_CACHE`` = ``<basetemp>/cache`` and ``$SAT_COGVIDEO_DEMO`` = ``<basetemp>/cache/demo`` for the
    whole session (the tiny demo model is built there once per session); the caller's values come back at the end."""
    saved = {k: os.environ.get(k) for k in CACHE_VARS}
    cache = tmp_path_factory.getbasetemp() / "cache"
    cache.mkdir(exist_ok=True)
    os.environ["SAT_COGVIDEO_CACHE"] = str(cache)
    os.environ["SAT_COGVIDEO_DEMO"] = str(cache / "demo")
    yield cache
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def restore_cache_vars():
    """Whatever a test sets (``demo_dir()`` exports ``SAT_COGVIDEO_DEMO``), the next test sees the values it started
    with."""
    saved = {k: os.environ.get(k) for k in CACHE_VARS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def dist_cpu():
    """torch.distributed (gloo, one process) and SAT's model-parallel state, as SAT's model code needs them."""
    from sat_cogvideo.distributed import init_distributed

    return init_distributed(device="cpu")


@pytest.fixture(scope="session")
def repo_root():
    return ROOT
