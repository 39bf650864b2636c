"""Shared fixtures: one random snapgen-tiny model and its fp16 and fp32 bundles, built once per run."""

from pathlib import Path

import pytest

from snapgen.cli import main


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mobile-models") / "tiny"
    assert main(["init-model", "--config", "snapgen-tiny", "--out", str(path), "--seed", "5"]) == 0
    return path


@pytest.fixture(scope="session")
def bundles_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="session")
def fp16_bundle(tiny_model, bundles_dir) -> Path:
    """Built through the CLI, as a user would."""
    assert main(["export", "coreml", "--model", str(tiny_model), "--out", str(bundles_dir)]) == 0
    path = bundles_dir / "tiny-fp16.zip"
    assert path.is_file()
    return path


@pytest.fixture(scope="session")
def fp32_bundle(tiny_model, bundles_dir) -> Path:
    from mobile_export.bundle import export_coreml

    return export_coreml(tiny_model, bundles_dir, precision="fp32", log=lambda _: None).path
