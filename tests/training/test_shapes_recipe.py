"""The shapes recipe: every config parses, and training/recipes/shapes.sh resumes from whatever
products exist (a finished run here, else the committed copy) and trains only what is missing.

The script's orchestration is what is tested here, on a copy of the recipe's layout: the trainer
it calls is a stand-in (``SNAPGEN``) that records each call and writes the product where the real
``snapgen train`` would, because the real stages take hours."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from training.config import load_config, parse_stage_options
from training.stages import stage_class

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "shapes").glob("*.yaml"))
GPU_CONFIGS = sorted((ROOT / "configs" / "shapes-gpu").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS + GPU_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shapes_config_parses_with_its_stage_options(path):
    config = load_config(path)
    parse_stage_options(config, stage_class(config.stage).Options)


def test_the_recipe_reads_every_product_from_the_products_folder():
    recipe = ("autoencoder", "decoder", "teacher", "kd", "kd-baseline", "ladd", "ladd-baseline", "ladd-noadv")
    for name in recipe:
        options = yaml.safe_load((ROOT / "configs" / "shapes" / f"{name}.yaml").read_text())["stage_options"]
        paths = [v for k, v in options.items() if k in ("autoencoder", "encoder", "decoder", "teacher",
                                                         "init_from", "distill_teacher") and v]
        assert all(p.startswith("runs/shapes/products/") for p in paths), (name, paths)
    ladd, noadv = (yaml.safe_load((ROOT / "configs/shapes" / f).read_text()) for f in ("ladd.yaml", "ladd-noadv.yaml"))
    assert noadv["stage_options"].pop("adv_weight") == 0 and ladd["stage_options"].pop("adv_weight") > 0
    assert {k: v for k, v in noadv.items() if k != "out_dir"} == {k: v for k, v in ladd.items() if k != "out_dir"}
    kd, base = (yaml.safe_load((ROOT / "configs/shapes" / f).read_text()) for f in ("kd.yaml", "kd-baseline.yaml"))
    assert base["stage_options"].pop("kd") is False and kd["stage_options"].pop("kd") is True
    assert {k: v for k, v in base.items() if k != "out_dir"} == {k: v for k, v in kd.items() if k != "out_dir"}


def test_the_gpu_recipe_is_the_cpu_recipe_at_a_larger_batch():
    """configs/shapes-gpu/NAME.yaml differs from configs/shapes/NAME.yaml only in its folders, the text
    table in MiniLM's place, the device and the batch/steps/data-loading knobs."""
    assert sorted(p.stem for p in GPU_CONFIGS) == ["kd", "kd-baseline", "ladd", "ladd-baseline"]
    scale = {"max_steps", "batch_size", "ckpt_every", "sample_every", "num_workers", "cpu_threads", "device"}
    for gpu_path in GPU_CONFIGS:
        cpu, gpu = (yaml.safe_load(p.read_text()) for p in (ROOT / "configs/shapes" / gpu_path.name, gpu_path))
        assert gpu["device"] == "cuda" and gpu["out_dir"] == cpu["out_dir"].replace("runs/shapes/", "runs/shapes-gpu/")
        assert gpu["stage_options"].pop("text_encoder") == "table:build/shapes-gpu/text-table.safetensors"
        assert cpu["stage_options"].pop("text_encoder") == "minilm:layers=0,6"
        paths = {k: v.replace("runs/shapes/", "runs/shapes-gpu/") if isinstance(v, str) else v
                 for k, v in cpu["stage_options"].items()}  # fmt: skip
        assert gpu["stage_options"] == paths, gpu_path.name
        for key in ("seed", "stage", "ema"):
            assert gpu[key] == cpu[key], (gpu_path.name, key)
        assert {k: v for k, v in gpu["optim"].items() if k != "warmup_steps"} == {
            k: v for k, v in cpu["optim"].items() if k != "warmup_steps"}
        assert {k: v for k, v in gpu["data"].items() if k not in ("length", "resolution_schedule")} == {
            k: v for k, v in cpu["data"].items() if k not in ("length", "resolution_schedule")}
        assert set(gpu) - scale - {"out_dir", "stage_options", "optim", "data"} <= set(cpu)


FAKE_TRAINER = """#!/usr/bin/env bash
# snapgen train STAGE --config F [--resume]: log the call; leave the product where the stage would.
set -e
echo "$2 $(basename "$4" .yaml) ${5:-}" >> "$CALLS"
out=$(sed -n 's/^out_dir: *//p' "$4")
name=$(basename "$4" .yaml)
[ -n "${FAIL:-}" ] && [ "$name" = "$FAIL" ] && { mkdir -p "$out/checkpoints"; exit 1; }
case "$2" in
    autoencoder) mkdir -p "$out/autoencoder" ;;
    decoder) mkdir -p "$out/decoder" ;;
    *) mkdir -p "$out/model" && touch "$out/model/model_index.json" ;;
esac
"""


@pytest.fixture
def layout(tmp_path):
    """The recipe's script and configs, the committed products as empty stand-ins, a fake trainer."""
    for rel in ("training/recipes/shapes.sh", *(str(p.relative_to(ROOT)) for p in CONFIGS)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    for rel in ("snapgen/assets/snapgen-shapes/autoencoder", "snapgen/assets/snapgen-shapes/decoder",
                "training/products/shapes/teacher"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "committed").touch()
    trainer = tmp_path / "fake-snapgen"
    trainer.write_text(FAKE_TRAINER)
    trainer.chmod(0o755)
    return tmp_path


def run_recipe(layout: Path, stages: str, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    calls = layout / "calls.txt"
    calls.unlink(missing_ok=True)
    result = subprocess.run(
        ["bash", str(layout / "training/recipes/shapes.sh")],
        env={**os.environ, "SNAPGEN": str(layout / "fake-snapgen"), "CALLS": str(calls), "STAGES": stages, **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return result, calls.read_text().splitlines() if calls.exists() else []


def product(layout: Path, name: str) -> Path:
    return (layout / "runs/shapes/products" / name).resolve()


def test_a_fresh_clone_starts_from_the_committed_products_and_trains_the_rest(layout):
    result, calls = run_recipe(layout, "autoencoder decoder teacher kd ladd", PARALLEL="0")
    assert result.returncode == 0, result.stderr
    assert calls == ["kd kd ", "ladd ladd "]  # autoencoder, decoder and teacher are committed
    assert "teacher: the committed product (training/products/shapes/teacher)" in result.stdout
    assert product(layout, "teacher") == layout / "training/products/shapes/teacher"
    assert product(layout, "autoencoder") == layout / "snapgen/assets/snapgen-shapes/autoencoder"
    assert product(layout, "kd") == layout / "runs/shapes/kd/model"
    assert (layout / "runs/shapes/kd/DONE").read_text().endswith(" s\n")

    # Started again: every stage is done or committed, nothing is trained.
    result, calls = run_recipe(layout, "autoencoder decoder teacher kd ladd", PARALLEL="0")
    assert result.returncode == 0 and calls == []
    assert "kd: done already" in result.stdout

    # RETRAIN trains a stage whose product is committed, and later stages read the new product.
    result, calls = run_recipe(layout, "teacher", RETRAIN="teacher")
    assert result.returncode == 0 and calls == ["pretrain teacher "]
    assert product(layout, "teacher") == layout / "runs/shapes/teacher/model"


def test_an_interrupted_stage_resumes_and_the_ablations_run_side_by_side(layout):
    result, calls = run_recipe(layout, "kd kd-baseline", FAIL="kd")
    assert result.returncode != 0 and not (layout / "runs/shapes/kd/DONE").exists()
    assert sorted(calls) == ["kd kd ", "kd kd-baseline "]
    assert (layout / "runs/shapes/kd-baseline/DONE").exists()

    # Again: the finished half is kept, the other resumes from its checkpoints.
    result, calls = run_recipe(layout, "kd kd-baseline ladd ladd-baseline ladd-noadv")
    assert result.returncode == 0, result.stderr
    assert calls[0] == "kd kd --resume"
    assert sorted(calls[1:]) == ["ladd ladd ", "ladd ladd-baseline ", "ladd ladd-noadv "]
    assert product(layout, "kd-baseline") == layout / "runs/shapes/kd-baseline/model"


def test_ship_swaps_the_product_in_whole_and_keeps_the_encoder(layout):
    # The committed teacher shares the old default's U-Net weights through a link into the package.
    (layout / "snapgen/assets/snapgen-shapes/unet").mkdir()
    (layout / "snapgen/assets/snapgen-shapes/unet/weights").write_text("the old default")
    (layout / "training/products/shapes/teacher/unet").mkdir()
    (layout / "training/products/shapes/teacher/unet/weights").symlink_to(
        "../../../../../snapgen/assets/snapgen-shapes/unet/weights")
    (layout / "runs/shapes/ladd/model/unet").mkdir(parents=True)
    (layout / "runs/shapes/ladd/model/model_index.json").write_text("{}")
    (layout / "runs/shapes/ladd/DONE").write_text("1 s\n")
    result, calls = run_recipe(layout, "ship")
    assert result.returncode == 0, result.stderr
    assets = layout / "snapgen/assets/snapgen-shapes"
    assert calls == [] and sorted(p.name for p in assets.iterdir()) == ["autoencoder", "model_index.json", "unet"]
    assert (assets / "autoencoder" / "committed").exists() and not assets.is_symlink()
    teacher_weights = layout / "training/products/shapes/teacher/unet/weights"
    assert teacher_weights.read_text() == "the old default" and not teacher_weights.is_symlink()
    assert not (layout / "snapgen/assets/snapgen-shapes.old").exists()
    result, _ = run_recipe(layout, "ship", PRODUCT="runs/shapes/nothing")
    assert result.returncode == 1 and "no LADD product" in result.stderr
    assert sorted(p.name for p in assets.iterdir()) == ["autoencoder", "model_index.json", "unet"]
