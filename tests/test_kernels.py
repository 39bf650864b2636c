"""The Triton kernels (snapgen.models.kernels) against the PyTorch code they replace, and the switch between them.

The kernel checks run in child processes. Triton's CPU interpreter is chosen by TRITON_INTERPRET=1 when a
kernel is decorated, i.e. when triton and the kernel modules are imported, and another test module in this
pytest process may already have imported them without it; the compile check needs the opposite (no
interpreter). So tests/kernel_checks.py (interpreted: values) and tests/kernel_compile.py (compiled for an
H100: that a GPU would accept every variant) each run once in a fresh interpreter, and the tests here read
their JSON. The switch's error paths are also checked in children, whose environment this module controls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import kernel_checks
import pytest
import torch

from snapgen.models.configs import build_unet
from snapgen.models.kernels import active, set_kernels

HERE = Path(__file__).parent


def run_child(args: list[str], interpret: bool, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, *args], env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def child_json(script: str, interpret: bool, timeout: int):
    return json.loads(run_child([str(HERE / script)], interpret, timeout).stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return child_json("kernel_checks.py", interpret=True, timeout=900)


@pytest.mark.parametrize("name", list(kernel_checks.CHECKS))
def test_kernels_match_the_pytorch_code_they_replace(interpreted, name):
    cases = interpreted[name]
    assert not isinstance(cases, dict), cases["error"]
    failed = [case for case in cases if not case["ok"]]
    assert cases and not failed, failed


def test_every_kernel_variant_the_models_launch_compiles_for_an_h100():
    results = child_json("kernel_compile.py", interpret=False, timeout=600)
    kernels = {case["case"].split()[0] for case in results}
    assert kernels == {
        "_group_stats_kernel",
        "_group_merge_kernel",
        "_scale_shift_act_kernel",
        "_depthwise3x3_kernel",
        "_geglu_kernel",
        "_qk_norm_rope_kernel",
    }
    failed = [case for case in results if not case["ok"]]
    assert not failed, failed[0].get("error", failed[0])


@torch.no_grad()
def test_models_start_on_the_pytorch_path_and_torch_changes_nothing():
    torch.manual_seed(0)
    unet = build_unet("snapgen-tiny").eval()
    x = (torch.randn(1, 4, 16, 16), torch.tensor([0.5]), torch.randn(1, 3, 384), None, torch.randn(1, 384))
    ref = unet(*x).sample
    assert not active(unet)
    set_kernels(unet, "torch")
    assert not active(unet)
    assert all("forward" not in m.__dict__ for m in unet.modules())
    assert torch.equal(unet(*x).sample, ref)
    with pytest.raises(ValueError, match="torch, triton"):
        set_kernels(unet, "cuda")


NO_GPU_NO_INTERPRETER = """
    import torch
    from snapgen.models import kernels
    from snapgen.models.configs import build_unet

    if torch.cuda.is_available():
        print("gpu")
        raise SystemExit
    unet = build_unet("snapgen-tiny").eval()
    reason = kernels.available()
    assert "TRITON_INTERPRET=1" in reason, reason
    try:
        kernels.set_kernels(unet, "triton")
        raise AssertionError("set_kernels accepted triton")
    except RuntimeError as e:
        assert reason in str(e)
    assert not kernels.active(unet)

    # A GPU machine with the model left on the CPU: the kernels refuse CPU tensors and say what to do.
    torch.cuda.is_available = lambda: True
    kernels.set_kernels(unet, "triton")
    x = (torch.randn(1, 4, 16, 16), torch.tensor([0.5]), torch.randn(1, 3, 384), None, torch.randn(1, 384))
    try:
        with torch.no_grad():
            unet(*x)
        raise AssertionError("the kernels ran on CPU tensors without the interpreter")
    except RuntimeError as e:
        assert "TRITON_INTERPRET=1" in str(e) and "set_kernels(model, 'torch')" in str(e), e
    print("ok")
"""


def test_without_a_gpu_or_the_interpreter_triton_is_refused_clearly():
    out = run_child(["-c", textwrap.dedent(NO_GPU_NO_INTERPRETER)], interpret=False, timeout=300).stdout
    if out.strip() == "gpu":
        pytest.skip("this machine has a GPU: the kernels can run")
    assert out.strip() == "ok"


NO_TRITON = """
    import sys

    sys.modules["triton"] = None  # as if not installed
    import torch
    from snapgen.models import kernels
    from snapgen.models.configs import build_unet
    from snapgen.tracing import TracedUNet

    reason = kernels.available()
    assert "pip install 'snapgen[kernels]'" in reason, reason
    unet = build_unet("snapgen-tiny").eval()
    try:
        kernels.set_kernels(unet, "triton")
        raise AssertionError("set_kernels accepted triton")
    except RuntimeError as e:
        assert reason in str(e)
    kernels.set_kernels(unet, "torch")
    x = (torch.randn(1, 4, 16, 16), torch.tensor([0.5]), torch.randn(1, 3, 384), torch.ones(1, 3), torch.randn(1, 384))
    with torch.no_grad():
        traced = TracedUNet(unet)
        assert torch.equal(traced(*x), unet(*x).sample) and len(traced) == 1
    print("ok")
"""


def test_without_triton_installed_the_pytorch_path_and_tracing_work():
    out = run_child(["-c", textwrap.dedent(NO_TRITON)], interpret=False, timeout=300).stdout
    assert out.strip() == "ok"
