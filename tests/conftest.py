"""Fixtures shared by the test modules: train.py and test.py loaded once per module, and a
compile cache that stays out of the user's home."""
import pytest

from subprocesses import load_script


@pytest.fixture(scope="module")
def train_script():
    return load_script("train")


@pytest.fixture(scope="module")
def test_script():
    return load_script("test")


@pytest.fixture(scope="session", autouse=True)
def compile_cache_in_tmp(tmp_path_factory):
    """Runs that compile keep their cache in a temporary folder, not the user's ~/.cache."""
    import os
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("compile_cache"))
    yield
    if saved is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
