"""``snapgen``: the command line. Thin: parse, call the library, print."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path


class CLIError(Exception):
    """An error the user can fix; printed without a traceback, exit status 2."""


# What the model extra brings (pyproject.toml): the base install and the `api` extra carry none of it.
MODEL_MODULES = ("torch", "diffusers", "transformers", "safetensors")


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    """The top-level modules of ``modules`` that cannot be imported here, found without importing them."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def require_modules(modules: tuple[str, ...], what: str, install: str) -> None:
    """A :class:`CLIError` naming the pip extra to install when ``what`` needs a module that is not installed,
    rather than a traceback from deep inside the first import of it."""
    missing = missing_modules(modules)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise CLIError(f"{what} needs {', '.join(missing)}, which {verb} not installed: {install}")


def require_model_stack(what: str) -> None:
    require_modules(MODEL_MODULES, what, "pip install 'snapgen[model]'")


KERNELS = ("torch", "triton")  # --kernels: snapgen.models.kernels.set_kernels(module, kind)


def check_kernels(kind: str, device: str, flag: str = "--kernels") -> None:
    """Refuse Triton kernels where they cannot run, before torch is imported: they run on CUDA devices, and
    on a CPU only through Triton's interpreter (``TRITON_INTERPRET=1``, slow: for checking)."""
    if kind != "triton":
        return
    if missing_modules(("triton",)):
        raise CLIError(f"{flag} triton: the triton package is not installed (pip install triton), or use {flag} torch")
    if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise CLIError(
            f"{flag} triton: Triton kernels run on CUDA devices, and the device is {device}; on a CPU they run "
            f"only through Triton's interpreter: set TRITON_INTERPRET=1 (slow, for checking), or use {flag} torch"
        )


def use_kernels(kind: str, modules, flag: str = "--kernels") -> None:
    """Switch ``modules`` (the U-Net, the decoder) to ``kind``'s kernels, or say in one line why Triton cannot run."""
    if kind == "torch":
        return
    from .models import kernels

    reason = kernels.available()
    if reason is not None:
        raise CLIError(f"{flag} {kind}: {reason}")
    for module in modules:
        kernels.set_kernels(module, kind)


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        return value

    return parse


# The flag that sets each field of a generation request, for error messages.
FLAGS = {"prompt": "prompt", "guidance_scale": "--guidance", "size": "--height/--width", "image": "--image"}


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate images from text prompts")
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompt-file)")
    p.add_argument("--prompt-file", type=Path,
                   help="one prompt per line: line 1 -> DIR/0000.png, line 2 -> 0001.png, ...; a blank line is an "
                   "error (it would shift the numbering), blank lines at the end are ignored")  # fmt: skip
    p.add_argument("--out", type=Path, help="output PNG for a single prompt (default: out.png)")
    p.add_argument("--out-dir", type=Path, help="output directory for --prompt-file")
    p.add_argument("--model", type=Path, help="model directory (default: the embedded default model)")
    p.add_argument("--seed", type=_positive_int("--seed"), help="seed (default 0); image i uses seed + i")
    p.add_argument("--steps", type=_positive_int("--steps"), help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=_positive_int("--height"))
    p.add_argument("--width", type=_positive_int("--width"))
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    p.add_argument("--kernels", choices=KERNELS, default="torch",
                   help="the U-Net's and decoder's kernels: torch (default) or triton (fused; on a CUDA device, or on "
                   "the CPU through TRITON_INTERPRET=1: slow, for checking)")  # fmt: skip
    p.add_argument("--image", type=Path, help="input image for image-to-image (with --strength); its size by default")
    p.add_argument("--strength", type=float,
                   help="image-to-image: how far the input goes towards noise, 0 (keep it) to 1 (ignore)")  # fmt: skip
    p.add_argument("--from", dest="from_image", type=Path, metavar="IMAGE.png",
                   help="make again the image whose parameters IMAGE.png carries (flags given here override them)")
    p.add_argument("--timings", action="store_true",
                   help="print where the time went (imports, load, text, U-Net, decode, write) to stderr")  # fmt: skip
    p.set_defaults(func=cmd_generate)


def _add_info(sub):
    p = sub.add_parser("info", help="describe a named config, a saved model, or a generated image")
    p.add_argument("image", nargs="?", type=Path, help="a PNG from snapgen: print its generation parameters")
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


def _model_directory(model: Path | None) -> Path:
    """The model directory to use, checked for its layout (JSON and folders only, nothing imported)."""
    from .model_dir import ModelDirectoryError, check_model_dir, default_model_dir

    directory = model if model is not None else default_model_dir()
    if not directory.exists():
        if model is None:
            raise CLIError(
                f"the embedded default model is not installed at {directory}; pass --model DIR "
                "(a random test model: `snapgen init-model --out DIR`)"
            )
        raise CLIError(f"--model {model}: no such directory")
    try:
        return check_model_dir(directory)
    except ModelDirectoryError as e:
        raise CLIError(f"--model {directory}: {e}") from None


def _model_card(directory: Path):
    from .model_dir import read_model_card

    try:
        return read_model_card(directory)
    except KeyError as e:
        raise CLIError(f"--model {directory}: its model_index.json lacks {e}") from None
    except (OSError, ValueError, TypeError) as e:
        raise CLIError(f"--model {directory}: {e}") from None


def _load(directory: Path, device: str):
    from .model_dir import ModelDirectoryError, load_pipeline

    try:
        return load_pipeline(directory, device=device)
    except (ModelDirectoryError, FileNotFoundError, ValueError) as e:
        raise CLIError(f"--model {directory}: {e}") from None


def _read_prompt_file(path: Path) -> list[str]:
    """One prompt per line, so that output ``i`` is line ``i + 1``: a blank line inside the file would
    shift every later number, so it is refused; blank lines at the end shift nothing and are dropped."""
    if not path.is_file():
        raise CLIError(f"--prompt-file {path}: no such file")
    lines = [line.strip() for line in path.read_text().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise CLIError(f"--prompt-file {path}: no prompts in it")
    blank = [number for number, line in enumerate(lines, start=1) if not line]
    if blank:
        more = f" (and {len(blank) - 1} more)" if len(blank) > 1 else ""
        raise CLIError(
            f"--prompt-file {path}: line {blank[0]} is blank{more}; each line makes one image (line 1 -> "
            "0000.png, line 2 -> 0001.png, ...): remove blank lines or write a prompt there"
        )
    return lines


def cmd_generate(args) -> None:
    started = time.perf_counter()
    from .request import GenerationRequest, InvalidRequestError

    # Everything that needs no model is checked first, then the request against the model's JSON (its
    # sizes and step limits): a bad flag fails in milliseconds, before torch is imported.
    if args.from_image is not None:
        _take_parameters_from(args)
    if (args.prompt is None) == (args.prompt_file is None):
        raise CLIError("give exactly one of PROMPT, --prompt-file or --from")
    if args.prompt_file is not None:
        if args.out_dir is None:
            raise CLIError("--prompt-file needs --out-dir")
        prompts = _read_prompt_file(args.prompt_file)
        outputs = [args.out_dir / f"{i:04d}.png" for i in range(len(prompts))]
    else:
        prompts = [args.prompt]
        outputs = [args.out or Path("out.png")]
        if outputs[0].suffix.lower() != ".png":
            raise CLIError(f"--out {outputs[0]}: only .png output is supported")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size: got {args.batch_size}; allowed: an integer >= 1")

    def flag_error(e: InvalidRequestError) -> CLIError:
        return CLIError(f"{FLAGS.get(e.field, '--' + e.field.replace('_', '-'))}: {e.message}")

    image = _read_input_image(args)
    try:
        request = GenerationRequest(
            prompts,
            negative_prompt=args.negative_prompt,
            seed=0 if args.seed is None else args.seed,
            steps=args.steps,
            guidance_scale=args.guidance,
            height=args.height or (image.height if image is not None and not args.width else None),
            width=args.width or (image.width if image is not None and not args.height else None),
            strength=args.strength,
        )
        directory = _model_directory(args.model)
        if args.from_image is not None:
            _check_same_model(args, directory)
        resolved = request.resolve(_model_card(directory))
    except InvalidRequestError as e:
        raise flag_error(e) from None
    _warn_unused_negative_prompt(resolved)
    check_kernels(args.kernels, args.device)

    checked = time.perf_counter()
    require_model_stack("snapgen generate")
    with _collector_paused(args):
        from .devices import DeviceError, check_device

        try:
            check_device(args.device)
        except DeviceError as e:
            raise CLIError(str(e)) from None
        from tqdm import tqdm

        importlib.import_module(".pipeline", __package__)  # torch, diffusers, the model code: timed apart from the load
        from .image_files import encode_image, image_parameters
        from .model_dir import write_file_atomically

        imported = time.perf_counter()
        pipeline = _load(directory, args.device)
        use_kernels(args.kernels, (pipeline.unet, pipeline.decoder))
        loaded = time.perf_counter()
    try:
        # Resolved as a whole before the first image (now with the tokenizer: prompt lengths too), so a
        # bad prompt on line 900 fails now.
        resolved = pipeline.resolve(request)
    except InvalidRequestError as e:
        raise flag_error(e) from None

    stages = []

    def advance(bar, images):
        # An on_step callback that returns a tensor replaces the latents: this one returns nothing.
        def on_step(i, n, x):
            bar.update(images)

        return on_step

    with tqdm(total=resolved.images * resolved.steps, unit="step", disable=None, desc="sampling") as bar:
        for start, chunk in zip(range(0, resolved.images, args.batch_size), resolved.chunks(args.batch_size)):
            ran = time.perf_counter()
            try:
                result = pipeline.run(chunk, on_step=advance(bar, chunk.images), output_type="np", image=image)
            except InvalidRequestError as e:  # the input image: its size, or a model that cannot encode it
                raise flag_error(e) from None
            stages.append({**result.timings, "run_s": time.perf_counter() - ran})
            model, unet_sha256 = pipeline.provenance()
            for i, (array, path) in enumerate(zip(result.images, outputs[start : start + chunk.images], strict=True)):
                png = encode_image(array, "png", image_parameters(chunk, i, model, unet_sha256))
                write_file_atomically(path, lambda f, png=png: f.write(png))
    where = outputs[0] if len(outputs) == 1 else args.out_dir
    print(f"wrote {len(outputs)} image(s) to {where}")
    if args.timings:
        done = time.perf_counter()
        sampled = {key: sum(float(t.get(f"{key}_s", 0.0)) for t in stages) for key in ("text", "unet", "decode", "run")}
        parts = {
            "checks": checked - started,
            "imports": imported - checked,
            "load": loaded - imported,
            "text": sampled["text"],
            "unet": sampled["unet"],
            "decode": sampled["decode"],
            "write": done - loaded - sampled["run"],  # resolve, PNG encoding, provenance hash, files
            "total": done - started,
        }
        print("timings: " + ", ".join(f"{k} {v:.3f} s" for k, v in parts.items()), file=sys.stderr)


@contextlib.contextmanager
def _collector_paused(args):
    """Importing torch, diffusers and transformers and loading a model make millions of long-lived objects
    and next to no garbage cycles: the cyclic collector, walking them again and again meanwhile, costs
    about a quarter of that time (reference counting still frees the rest). Afterwards they are frozen
    (``gc.freeze``) so that its next full pass does not walk them all once more; :func:`main` gives them
    back to it when the command returns to a caller that lives on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        args.collector_frozen = True
        if enabled:
            gc.enable()


def _take_parameters_from(args) -> None:
    """Fill the generation flags the command line left unset from the parameters inside ``--from IMAGE.png``."""
    from .image_files import read_parameters

    if args.prompt is not None or args.prompt_file is not None:
        raise CLIError("--from takes the prompt from the image: give no PROMPT or --prompt-file")
    try:
        parameters = read_parameters(args.from_image)
    except (OSError, ValueError) as e:
        raise CLIError(f"--from {args.from_image}: cannot read it as an image ({e})") from None
    if parameters is None:
        raise CLIError(f"--from {args.from_image}: it carries no snapgen parameters (only snapgen's PNGs do)")
    if parameters.get("strength") is not None and args.image is None:
        raise CLIError(f"--from {args.from_image}: it was made from an input image (strength "
                       f"{parameters['strength']}), which is not in the file; give it with --image")  # fmt: skip
    args.prompt = parameters["prompt"]
    for flag, key in (("negative_prompt", "negative_prompt"), ("seed", "seed"), ("steps", "steps"),
                      ("guidance", "guidance_scale"), ("height", "height"), ("width", "width"),
                      ("strength", "strength")):  # fmt: skip
        if getattr(args, flag) is None and parameters.get(key) not in (None, ""):
            setattr(args, flag, parameters[key])
    args.from_parameters = parameters


def _check_same_model(args, directory: Path) -> None:
    """The same bytes need the same weights: refuse a model whose U-Net is not the one that made the image."""
    from .model_dir import provenance

    wanted = args.from_parameters.get("unet_sha256")
    name, have = provenance(directory)
    if wanted and have and wanted != have:
        raise CLIError(f"--from {args.from_image}: it was made by {args.from_parameters.get('model')} (U-Net sha256 "
                       f"{wanted[:12]}...), not by {name} ({have[:12]}...): pass that model's directory with --model")


def _read_input_image(args):
    if (args.image is None) != (args.strength is None):
        raise CLIError("--image and --strength go together: image-to-image needs both (strength 0 keeps the "
                       "input, 1 ignores it)")  # fmt: skip
    if args.image is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(args.image) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise CLIError(f"--image {args.image}: cannot read it as an image ({e})") from None


def _warn_unused_negative_prompt(resolved) -> None:
    if resolved.negative_prompt_unused:
        print(
            "snapgen generate: warning: --negative-prompt has no effect at guidance 1 (the unconditional pass it "
            "feeds is skipped); pass --guidance with another value to use it",
            file=sys.stderr,
        )


def cmd_info(args) -> None:
    if args.image is not None:
        info = _image_info(args.image)  # PNG text chunks: no model stack needed
    elif args.list or args.config:
        require_model_stack("snapgen info --list/--config")
        from .models.configs import UNET_CONFIGS

        if args.list:
            info = {"configs": sorted(UNET_CONFIGS)}
        elif args.config not in UNET_CONFIGS:
            raise CLIError(f"--config {args.config!r}: unknown; choose one of {', '.join(sorted(UNET_CONFIGS))}")
        else:
            info = describe_config(args.config)
    else:
        require_model_stack("snapgen info --model")
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


def _image_info(path: Path) -> dict:
    from .image_files import read_parameters

    try:
        parameters = read_parameters(path)
    except (OSError, ValueError) as e:
        raise CLIError(f"{path}: cannot read it as an image ({e})") from None
    if parameters is None:
        raise CLIError(f"{path}: it carries no snapgen parameters (only snapgen's PNGs do)")
    return parameters


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
    require_model_stack("snapgen init-model")
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


def _offline_and_quiet() -> None:
    """Nothing is downloaded at run time, and our own progress bar is the one users see, not one per
    weight file. Environment variables, read when the libraries are imported, so that a command that
    fails early imports none of them; their warnings stay on."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow this too


def main(argv: list[str] | None = None) -> int:
    """Run a command; ``argv`` None means this process's own command line, which ends when this returns."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _offline_and_quiet()
    try:
        args.func(args)
    except CLIError as e:
        print(f"snapgen {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if argv is None and "triton" not in sys.modules:
            # At exit the interpreter's collector walks every object torch and diffusers made at import
            # (about 1 s on 2 CPU cores, a quarter of a cold `snapgen generate`); the process is ending, so
            # they are marked permanent instead. Callers passing ``argv`` (tests, scripts) live on: not for them.
            # Not with triton loaded (torch imports it where it is installed): its bindings report every
            # object still alive at exit, some thirty lines on stderr.
            gc.freeze()
        elif getattr(args, "collector_frozen", False):
            gc.unfreeze()
    return 0


if __name__ == "__main__":
    sys.exit(main())
