"""Fixtures shared across test folders (a folder's own conftest.py may override them)."""

from pathlib import Path

import pytest

from snapgen.cli import main


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight snapgen-tiny model (128 px images, 2 default steps), made once per run."""
    path = tmp_path_factory.mktemp("models") / "tiny"
    assert main(["init-model", "--config", "snapgen-tiny", "--out", str(path), "--seed", "1", "--steps", "2"]) == 0
    return path
