"""``snapgen``: the command line. Thin: parse, call the library, print."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path


class CLIError(Exception):
    """An error the user can fix; printed without a traceback, exit status 2."""


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        return value

    return parse


# The flag that sets each field of a generation request, for error messages.
FLAGS = {"prompt": "prompt", "guidance_scale": "--guidance", "size": "--height/--width"}


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate images from text prompts")
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompt-file)")
    p.add_argument("--prompt-file", type=Path, help="one prompt per line; writes DIR/0000.png, 0001.png, ...")
    p.add_argument("--out", type=Path, help="output PNG for a single prompt (default: out.png)")
    p.add_argument("--out-dir", type=Path, help="output directory for --prompt-file")
    p.add_argument("--model", type=Path, help="model directory (default: the embedded default model)")
    p.add_argument("--seed", type=_positive_int("--seed"), default=0, help="seed; image i uses seed + i")
    p.add_argument("--steps", type=_positive_int("--steps"), help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=_positive_int("--height"))
    p.add_argument("--width", type=_positive_int("--width"))
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=8)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)


def _add_info(sub):
    p = sub.add_parser("info", help="describe a named config or a saved model")
    p.add_argument("--config", help="a named U-Net config (see `snapgen info --list`)")
    p.add_argument("--model", type=Path, help="a model directory (default: the embedded default model)")
    p.add_argument("--list", action="store_true", help="list the named configs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)


def _add_init_model(sub):
    p = sub.add_parser(
        "init-model",
        help="save a randomly initialised model directory (for tests and trying the plumbing)",
    )
    p.add_argument("--config", default="snapgen-tiny", help="a named U-Net config using the MiniLM text encoder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4, help="default sampling steps stored in the model")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.set_defaults(func=cmd_init_model)


# The other rooms of the project add their own subcommands (`train`, `serve`, `export`, ...):
# each of these modules has ``add_commands(subparsers)`` and keeps its heavy imports lazy.
EXTENSIONS = ("training.cli", "training.shapesbench.cli", "server.cli", "mobile_export.cli", "triton_export.cli")


def _add_extensions(sub) -> None:
    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                continue  # that part of the project is not installed

            raise
        module.add_commands(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snapgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_info(sub)
    _add_init_model(sub)
    _add_extensions(sub)
    return parser


def _load(model: Path | None, device: str):
    from .model_dir import ModelDirectoryError, default_model_dir, load_pipeline

    directory = model if model is not None else default_model_dir()
    if not directory.exists():
        if model is None:
            raise CLIError(
                f"the embedded default model is not installed at {directory}; pass --model DIR "
                "(a random test model: `snapgen init-model --out DIR`)"
            )
        raise CLIError(f"--model {model}: no such directory")
    try:
        return load_pipeline(directory, device=device)
    except (ModelDirectoryError, FileNotFoundError, ValueError) as e:
        raise CLIError(f"--model {directory}: {e}") from None


def cmd_generate(args) -> None:
    from tqdm import tqdm

    from .image_files import encode_image
    from .model_dir import write_file_atomically
    from .request import GenerationRequest, InvalidRequestError

    if (args.prompt is None) == (args.prompt_file is None):
        raise CLIError("give exactly one of PROMPT or --prompt-file")
    if args.prompt_file is not None:
        if args.out_dir is None:
            raise CLIError("--prompt-file needs --out-dir")
        if not args.prompt_file.is_file():
            raise CLIError(f"--prompt-file {args.prompt_file}: no such file")
        prompts = [line.strip() for line in args.prompt_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise CLIError(f"--prompt-file {args.prompt_file}: no prompts in it")
        outputs = [args.out_dir / f"{i:04d}.png" for i in range(len(prompts))]
    else:
        prompts = [args.prompt]
        outputs = [args.out or Path("out.png")]
        if outputs[0].suffix.lower() != ".png":
            raise CLIError(f"--out {outputs[0]}: only .png output is supported")

    try:
        request = GenerationRequest(
            prompts,
            negative_prompt=args.negative_prompt,
            seed=args.seed,
            steps=args.steps,
            guidance_scale=args.guidance,
            height=args.height,
            width=args.width,
        )
        pipeline = _load(args.model, args.device)
        # Resolved as a whole before the first image, so a bad prompt on line 900 fails now.
        resolved = pipeline.resolve(request)
    except InvalidRequestError as e:
        raise CLIError(f"{FLAGS.get(e.field, '--' + e.field.replace('_', '-'))}: {e.message}") from None

    with tqdm(total=resolved.images * resolved.steps, unit="step", disable=None, desc="sampling") as bar:
        for start, chunk in zip(range(0, resolved.images, args.batch_size), resolved.chunks(args.batch_size)):
            result = pipeline.run(chunk, on_step=lambda i, n, x, k=chunk.images: bar.update(k), output_type="np")
            for image, path in zip(result.images, outputs[start : start + chunk.images], strict=True):
                write_file_atomically(path, lambda f, image=image: f.write(encode_image(image, "png")))
    where = outputs[0] if len(outputs) == 1 else args.out_dir
    print(f"wrote {len(outputs)} image(s) to {where}")


def cmd_info(args) -> None:
    from .models.configs import UNET_CONFIGS

    if args.list:
        info = {"configs": sorted(UNET_CONFIGS)}
    elif args.config:
        if args.config not in UNET_CONFIGS:
            raise CLIError(f"--config {args.config!r}: unknown; choose one of {', '.join(sorted(UNET_CONFIGS))}")
        info = describe_config(args.config)
    else:
        from .model_dir import default_model_dir, describe_model

        directory = args.model or default_model_dir()
        if not directory.exists():
            raise CLIError(f"model directory {directory} does not exist")
        try:
            info = describe_model(directory)
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(f"--model {directory}: {e}") from None
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            if not isinstance(value, dict):
                print(f"{key}: {value}")


def describe_config(name: str) -> dict:
    """Parameter counts of a named config, built on the meta device (no weights allocated)."""
    from .models.configs import build_unet, count_parameters, unet_config
    from .models.tiny_decoder import TinyDecoder

    config = unet_config(name)
    unet = build_unet(config, device="meta")
    with __import__("torch").device("meta"):
        decoder = TinyDecoder(latent_channels=config["in_channels"])
    return {
        "config": name,
        "unet_params": count_parameters(unet),
        "decoder_params": count_parameters(decoder),
        "unet_config": config,
    }


def cmd_init_model(args) -> None:
    import torch

    from .model_dir import save_model
    from .models.configs import build_unet, unet_config
    from .models.tiny_decoder import TinyDecoder
    from .sampling import SamplerConfig
    from .text import MiniLMTextEncoder

    try:
        config = unet_config(args.config)
    except ValueError as e:
        raise CLIError(f"--config: {e}") from None
    text_encoder = MiniLMTextEncoder()
    if config["cross_attention_dim"] != text_encoder.token_dim:
        raise CLIError(
            f"--config {args.config}: its text width {config['cross_attention_dim']} needs CLIP/Gemma encoders "
            f"from local weights; init-model builds MiniLM models only (text width {text_encoder.token_dim})"
        )
    if args.out.exists() and not args.force:
        raise CLIError(f"--out {args.out} already exists; pass --force to replace it")
    torch.manual_seed(args.seed)
    unet = build_unet(config)
    decoder = TinyDecoder.for_latents(latent_channels=config["in_channels"], upsample_factor=8)
    sampler = SamplerConfig(default_steps=args.steps, guidance_scale=1.0)
    path = save_model(args.out, unet, decoder, text_encoder, sampler, overwrite=args.force)
    print(f"saved a randomly initialised {args.config} model to {path}")


def _quiet_libraries() -> None:
    """Our own progress bar is the one users should see, not one per weight file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.disable_progress_bar()
        logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        args.func(args)
    except CLIError as e:
        print(f"snapgen {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
