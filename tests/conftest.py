"""Fixtures shared by the test modules: train.py and test.py loaded once per module."""
import pytest

from subprocesses import load_script


@pytest.fixture(scope="module")
def train_script():
    return load_script("train")


@pytest.fixture(scope="module")
def test_script():
    return load_script("test")
