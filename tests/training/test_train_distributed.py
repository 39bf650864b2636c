"""Two processes (torchrun, gloo): the real `snapgen train` command, data-parallel on the CPU.

The loop all-gathers weight checksums at every checkpoint and fails if the replicas differ, so
a successful run proves the processes stayed identical while training on different data.
"""

import os
import subprocess
import sys

import yaml
from training_harness import REPO, micro_dict

from training import checkpoint
from training.logger import read_metrics


def test_two_processes_keep_identical_replicas(tmp_path):
    out = tmp_path / "ddp"
    data = micro_dict("autoencoder", tmp_path, out_dir=str(out), max_steps=6, batch_size=4, ckpt_every=3,
                      log_every=3, data={"length": 16})
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "snapgen.cli", "train", "autoencoder", "--config", str(path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical on all 2 processes" in result.stdout
    state = checkpoint.read_state(checkpoint.latest(out))
    assert state["step"] == 6 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["rng"][0]["torch"] != state["rng"][1]["torch"]  # each process drew its own noise
    losses = read_metrics(out / "metrics.csv")["loss"]
    assert [s for s, _ in losses] == [3, 6]  # one writer: rank 0 logged each step once
