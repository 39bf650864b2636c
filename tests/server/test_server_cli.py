"""`snapgen serve` / `snapgen worker`: refusals that must happen before anything is loaded; settings."""

from __future__ import annotations

import pytest

from server.settings import Settings, settings_from
from snapgen.cli import main


@pytest.fixture(autouse=True)
def _no_snapgen_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("SNAPGEN_"):
            monkeypatch.delenv(name)


def test_serve_without_a_model_says_the_default_is_missing(tmp_path, monkeypatch, capsys):
    import snapgen.model_dir

    monkeypatch.setattr(snapgen.model_dir, "DEFAULT_MODEL_DIR", tmp_path / "not-installed")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "default model is not installed" in err and "--model" in err and "init-model" in err


def test_serve_refuses_a_public_address_without_keys(tmp_path, capsys):
    assert main(["serve", "--host", "0.0.0.0", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "SNAPGEN_API_KEYS" in err and "--allow-unauthenticated" in err


def test_serve_and_worker_argument_errors(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "not a snapgen model directory" in capsys.readouterr().err
    assert main(["serve", "--api-processes", "2", "--model", str(tmp_path)]) == 2
    assert "--api-processes needs --redis" in capsys.readouterr().err
    assert main(["serve", "--redis", "redis://127.0.0.1:1/0", "--model", str(tmp_path)]) == 2
    assert "give --model to `snapgen worker`" in capsys.readouterr().err
    assert main(["serve", "--redis", "http://example.com"]) == 2
    assert "not a Redis URL" in capsys.readouterr().err
    assert main(["worker", "--model", str(tmp_path)]) == 2
    assert "a worker needs --redis" in capsys.readouterr().err
    assert main(["serve", "--api-keys-file", str(tmp_path / "missing.txt")]) == 2
    assert "--api-keys-file" in capsys.readouterr().err


def test_settings_from_env_and_flags(monkeypatch, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# ops\nkey-from-file\n\n")
    monkeypatch.setenv("SNAPGEN_API_KEYS", "k1, k2")
    monkeypatch.setenv("SNAPGEN_API_KEYS_FILE", str(keys))
    monkeypatch.setenv("SNAPGEN_CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("SNAPGEN_MAX_QUEUE_DEPTH", "9")
    settings = settings_from({"port": 9000, "host": None})
    assert settings.port == 9000 and settings.host == "127.0.0.1" and settings.max_queue_depth == 9
    assert settings.all_api_keys() == ["k1", "k2", "key-from-file"]
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    # Round trip through the environment (how several API processes get their settings).
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    again = Settings()
    assert again.model_dump() == settings.model_dump()
