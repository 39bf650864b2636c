"""``snapgen export coreml`` and ``snapgen export verify``.

``export`` is a parser with sub-commands that several modules extend: whichever module comes
first creates it, the others add to it. Use :func:`export_subcommands` from any
``add_commands(subparsers)``::

    from mobile_export.cli import export_subcommands       # or copy its ten lines
    p = export_subcommands(subparsers).add_parser("triton", help=...)

It finds an existing ``export`` parser (by its ``_SubParsersAction``), so the order of
``snapgen.cli.EXTENSIONS`` does not matter. Heavy imports (torch, coremltools) stay inside the
command functions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def export_subcommands(subparsers) -> argparse._SubParsersAction:
    """The sub-command table of ``snapgen export``, creating ``export`` on first use."""
    parser = subparsers.choices.get("export")
    if parser is None:
        parser = subparsers.add_parser(
            "export",
            help="export the model for other runtimes (Core ML bundles, ...)",
            description="Export the model for other runtimes.",
        )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest="export_command", required=True, metavar="FORMAT")


def _bits(text: str) -> int:
    if text not in ("4", "6", "8"):
        raise argparse.ArgumentTypeError(f"--palettize takes 4, 6 or 8 bits, got {text!r}")
    return int(text)


def _pixels(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--resolution must be an integer number of pixels, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--resolution must be positive, got {value}")
    return value


def add_commands(subparsers) -> None:
    sub = export_subcommands(subparsers)

    p = sub.add_parser(
        "coreml",
        help="convert text encoder, U-Net and tiny decoder to one Core ML bundle (zip)",
        description="Convert the model's text encoder, U-Net (one step) and tiny decoder with coremltools "
        "and write OUT/<model>-<precision>[-palN][-PXpx].zip with the .mlpackages, the tokenizer, "
        "golden outputs and manifest.json. Runs on Linux; see docs/mobile.md.",
    )
    p.add_argument("--model", type=Path, required=True, help="model directory")
    p.add_argument("--out", type=Path, required=True, help="directory for the bundle zip")
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16", help="weights and compute (default fp16)")
    p.add_argument(
        "--palettize", type=_bits, metavar="{4,6,8}", help="k-means palettize the text encoder and U-Net weights"
    )
    p.add_argument("--resolution", type=_pixels, metavar="PX", help="square image size (default: the model's)")
    p.add_argument(
        "--min-ios",
        type=int,
        choices=(17, 18),
        default=18,
        help="18 (default): fused attention op in text encoder and U-Net; 17: decomposed attention",
    )
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.set_defaults(func=cmd_coreml)

    p = sub.add_parser(
        "verify",
        help="check a bundle against a model directory (files, weights, specs; --numerics, --on-device)",
        description="Check a bundle: file hashes, every weight against the server checkpoint (bit-identical), "
        "interfaces, sampler and noise specs. --numerics adds onnxruntime-vs-PyTorch PSNR and recomputes the "
        "golden outputs; --on-device runs Core ML predict (macOS only).",
    )
    p.add_argument("bundle", type=Path, help="the bundle zip")
    p.add_argument("--model", type=Path, required=True, help="the model directory it should match")
    p.add_argument("--numerics", action="store_true", help="ONNX Runtime vs PyTorch PSNR, golden outputs re-run")
    p.add_argument("--on-device", action="store_true", help="run Core ML predict on the golden cases (macOS only)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_verify)


def _cli_error():
    from snapgen.cli import CLIError

    return CLIError


def _check_model_dir(path: Path) -> None:
    CLIError = _cli_error()
    if not path.is_dir():
        raise CLIError(f"--model {path}: no such directory")
    if not (path / "model_index.json").is_file():
        raise CLIError(f"--model {path}: not a snapgen model directory (no model_index.json)")


def cmd_coreml(args) -> None:
    CLIError = _cli_error()
    _check_model_dir(args.model)
    from .bundle import ExportError, export_coreml
    from .coreml import UnconvertibleOpError, WeightMappingError

    try:
        export_coreml(
            args.model,
            args.out,
            precision=args.precision,
            palettize=args.palettize,
            resolution=args.resolution,
            force=args.force,
            min_ios=args.min_ios,
        )
    except (ExportError, UnconvertibleOpError, WeightMappingError) as e:
        raise CLIError(str(e)) from None


def cmd_verify(args) -> None:
    CLIError = _cli_error()
    _check_model_dir(args.model)
    from .bundle import ExportError
    from .verify import verify_bundle

    try:
        report = verify_bundle(args.bundle, args.model, numerics=args.numerics, on_device=args.on_device)
    except ExportError as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(
            json.dumps(
                {
                    "bundle": str(report.bundle),
                    "ok": report.ok,
                    "passed": report.passed,
                    "problems": report.problems,
                    "numbers": report.numbers,
                },
                indent=2,
                default=str,
            )
        )
    else:
        for line in report.passed:
            print(f"ok    {line}")
        for key, value in sorted(report.numbers.items()):
            print(f"      {key}: {value:.2f} dB")
        for line in report.problems:
            print(f"FAIL  {line}")
    if not report.ok:
        more = f"; ... ({len(report.problems)} in all)" if len(report.problems) > 5 else ""
        shown = "; ".join(report.problems[:5]) + more
        raise CLIError(f"{args.bundle} failed verification: {shown}")
