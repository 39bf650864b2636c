"""``snapgen export triton``: added to the ``export`` command group of ``mobile_export.cli``.

Heavy imports (torch, onnx) stay inside the command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .interface import BACKENDS, INSTANCE_KINDS, MAX_BATCH_SIZE


def _batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {MAX_BATCH_SIZE}, got {text!r}") from None
    if not 1 <= value <= MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {MAX_BATCH_SIZE}, got {value}")
    return value


def add_commands(subparsers) -> None:
    from mobile_export.cli import export_subcommands

    p = export_subcommands(subparsers).add_parser(
        "triton",
        help="write an NVIDIA Triton model repository (text encoder, U-Net, decoder)",
        description="Write a Triton model repository with three models: snapgen_text_encoder, snapgen_unet and "
        "snapgen_decoder (config.pbtxt + the python backend's model.py with a copy of the weights, or model.onnx "
        "for the onnxruntime backend). The sampler loop stays in the worker: `snapgen worker --backend triton "
        "--triton-url grpc://HOST:8001`. See docs/triton.md.",
    )
    p.add_argument("--model", type=Path, help="model directory (default: the embedded default model)")
    p.add_argument("--out", type=Path, required=True, help="the repository directory to write (new or empty)")
    p.add_argument("--backend", default="python", help=f"{' or '.join(BACKENDS)} (default python)")
    p.add_argument("--max-batch-size", type=_batch_size, default=16,
                   help="Triton's max_batch_size: items per model call (default 16; the worker splits larger batches)")
    p.add_argument("--instance-kind", default="cpu", help=f"{' or '.join(INSTANCE_KINDS)}: KIND_CPU or KIND_GPU "
                   "instances (default cpu)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_triton)


def cmd_triton(args) -> None:
    from snapgen.cli import CLIError

    from .repository import TritonExportError, export_triton

    model = args.model
    if model is None:
        from snapgen.model_dir import default_model_dir

        model = default_model_dir()
        if not (model / "model_index.json").is_file():
            raise CLIError(
                f"the embedded default model is not installed at {model} (it ships with the package); "
                "pass --model DIR (a random test model: `snapgen init-model --out DIR`)"
            )
    try:
        export_triton(model, args.out, backend=args.backend, max_batch_size=args.max_batch_size,
                      instance_kind=args.instance_kind, force=args.force)  # fmt: skip
    except TritonExportError as e:
        raise CLIError(str(e)) from None
