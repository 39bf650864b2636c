"""`snapgen` starts fast and fails fast: what each command imports, and the errors that come before a load.

Timings are measured in bench/bench_cold_start.py, never asserted here: the imports are what make the time.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from snapgen.cli import _read_prompt_file, main
from snapgen.model_dir import (
    DEFAULT_MODEL_DIR,
    SAMPLER_DEFAULTS,
    TOKEN_LENGTH_DEFAULTS,
    read_model_card,
)
from snapgen.request import ModelCard

HEAVY = ("torch", "diffusers", "transformers")
FLOAT32_WARNING = "should be kept in float32"
WEIGHTS_BAR = "Loading weights"

# Runs main(ARGS) in a fresh interpreter and reports its exit status and which modules it imported.
PROBE = r"""
import json, sys
from snapgen.cli import main
try:
    code = main(sys.argv[2:])
except SystemExit as e:
    code = e.code
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPGEN_")}
    # Neither bars nor warnings are switched off from outside: what the test sees is what a user sees.
    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        env.pop(name, None)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def probe(tmp_path, *args, timeout=300):
    report = tmp_path / "probe.json"
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(report), *args],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=timeout,
    )  # fmt: skip
    assert report.is_file(), result.stderr
    data = json.loads(report.read_text())
    report.unlink()
    heavy = sorted({m.partition(".")[0] for m in data["modules"]} & set(HEAVY))
    return data["code"], data["modules"], heavy, result


def test_help_imports_nothing_heavy(tmp_path):
    code, _, heavy, result = probe(tmp_path, "--help")
    assert code == 0 and "generate" in result.stdout
    assert heavy == []
    code, _, heavy, result = probe(tmp_path, "generate", "--help")
    assert code == 0 and "--prompt-file" in result.stdout and heavy == []


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--steps", "abc"], "--steps"),  # argparse's own refusal
        (["--steps", "0"], "--steps"),
        (["--steps", "999"], "--steps"),
        (["--height", "256", "--width", "256"], "--height/--width"),
        (["--height", "256"], "--height"),
        (["--guidance", "-1"], "--guidance"),
        (["--seed", "-1"], "--seed"),
        (["--batch-size", "0"], "--batch-size"),
        (["--model", "no-such-model"], "--model"),
    ],
)
def test_rejected_argument_fails_before_any_heavy_import(tmp_path, args, flag):
    code, _, heavy, result = probe(tmp_path, "generate", "a red circle", "--out", "x.png", *args)
    assert code == 2
    assert heavy == []
    lines = result.stderr.strip().splitlines()
    assert flag in lines[-1]
    if args[1] != "abc":  # argparse prints its usage first; ours is one line
        assert len(lines) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_default_model_generates_without_autoencoder_classes_or_misleading_messages(tmp_path):
    args = ["generate", "a red circle", "--out", "x.png", "--negative-prompt", "blue", "--timings"]
    code, modules, _, result = probe(tmp_path, *args)
    assert code == 0, result.stderr
    assert (tmp_path / "x.png").is_file()
    timings = re.search(r"^timings: checks [0-9.]+ s, imports .* total [0-9.]+ s$", result.stderr, re.M)
    assert timings, result.stderr
    # The default model has a tiny decoder: diffusers' autoencoder classes (most of diffusers' model zoo)
    # must not be imported.
    assert not [m for m in modules if m.startswith("diffusers.models.autoencoders")]
    assert "diffusers.models.unets" not in modules
    assert FLOAT32_WARNING not in result.stderr and WEIGHTS_BAR not in result.stderr
    # Guidance is 1 for the default model: the negative prompt is unused, said once.
    assert result.stderr.count("--negative-prompt has no effect") == 1, result.stderr


def test_load_pipeline_prints_no_misleading_messages(tmp_path):
    script = (
        "from transformers.utils import logging\n"
        "from snapgen.model_dir import load_pipeline\n"
        "pipe = load_pipeline()\n"
        "pipe.to('cpu')\n"
        "assert logging.is_progress_bar_enabled()  # switched off for the load only\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert FLOAT32_WARNING not in result.stderr and WEIGHTS_BAR not in result.stderr


def test_autoencoder_classes_are_imported_when_a_directory_names_one(tmp_path):
    from diffusers import AutoencoderTiny

    AutoencoderTiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), latent_channels=4,
    ).save_pretrained(tmp_path / "taesd")  # fmt: skip
    script = (
        "import sys\n"
        "from snapgen.models.autoencoder import load_decoder\n"
        "assert 'diffusers.models.autoencoders' not in sys.modules\n"
        "decoder = load_decoder(sys.argv[1])\n"
        "assert decoder.class_name == 'AutoencoderTiny' and 'diffusers.models.autoencoders' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "taesd")], capture_output=True, text=True,
                            env=_env(), timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_models_package_names_resolve_lazily():
    import snapgen.models as models

    for name in models.__all__:
        assert getattr(models, name) is not None
    assert set(models.__all__) <= set(dir(models))
    with pytest.raises(AttributeError):
        models.NoSuchThing  # noqa: B018


@pytest.mark.parametrize("device", ["cuda", "cuda:99", "mps", "tpu-of-dreams"])
def test_unavailable_device_is_one_line_naming_the_flag(tmp_path, capsys, device):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--out", str(out), "--device", device]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--device {device}:" in err and "available: cpu" in err
    assert not out.exists()


def test_negative_prompt_warning_only_where_it_has_no_effect(tmp_path, capsys):
    # The device is refused after the request is resolved, so these stop before any load.
    base = ["generate", "a red circle", "--out", str(tmp_path / "x.png"), "--negative-prompt", "blue"]
    assert main([*base, "--device", "cuda:99"]) == 2
    assert capsys.readouterr().err.count("--negative-prompt has no effect") == 1
    assert main([*base, "--guidance", "3", "--device", "cuda:99"]) == 2
    assert "--negative-prompt" not in capsys.readouterr().err


def test_serve_refuses_a_busy_port_before_loading(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, heavy, result = probe(tmp_path, "serve", "--port", str(port), timeout=60)
    assert code == 2 and heavy == []
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--port {port}" in lines[0] and "in use" in lines[0]


def test_prompt_file_blank_line_is_an_error_naming_it(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    out_dir = tmp_path / "grid"
    assert main(["generate", "--prompt-file", str(prompts), "--out-dir", str(out_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--prompt-file" in err and "line 2 is blank" in err
    assert not out_dir.exists()


def test_prompt_file_keeps_line_numbers(tmp_path):
    # Trailing blank lines shift no number, so they are dropped; inner ones are refused (above).
    path = tmp_path / "p.txt"
    path.write_text("  a red circle \na blue square\n\n  \n")
    assert _read_prompt_file(path) == ["a red circle", "a blue square"]


def test_light_model_card_matches_the_request_contract(tiny_model):
    for directory in (DEFAULT_MODEL_DIR, tiny_model):
        assert read_model_card(directory) == ModelCard.from_model_dir(directory)


def test_light_model_card_defaults_match_the_classes():
    from snapgen.sampling import SamplerConfig
    from snapgen.text import _ENCODER_TYPES

    config = SamplerConfig()
    assert {k: getattr(config, k) for k in SAMPLER_DEFAULTS} == SAMPLER_DEFAULTS
    leaves = {name: cls for name, cls in _ENCODER_TYPES.items() if name != "merged"}
    assert {
        name: inspect.signature(cls.__init__).parameters["max_length"].default for name, cls in leaves.items()
    } == TOKEN_LENGTH_DEFAULTS
