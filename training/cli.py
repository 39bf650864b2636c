"""``snapgen train STAGE --config FILE [--max-steps N] [--out DIR] [--resume | --export-checkpoint STEP]``.

Single process: ``snapgen train pretrain --config configs/micro/pretrain.yaml``.
Several processes / GPUs: ``torchrun --nproc_per_node 8 -m snapgen.cli train pretrain --config ...``
(or ``accelerate launch -m snapgen.cli train ...``); see docs/training.md.
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_commands(subparsers) -> None:
    from .stages import STAGES

    p = subparsers.add_parser("train", help="train one stage of the recipe from a YAML config")
    p.add_argument("stage", choices=list(STAGES), help="the stage to train")
    p.add_argument("--config", type=Path, required=True, help="YAML config (see configs/ and docs/training.md)")
    p.add_argument("--max-steps", type=int, help="override max_steps")
    p.add_argument("--out", type=Path, help="override out_dir")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in the output directory"
    )
    start.add_argument(
        "--export-checkpoint",
        type=int,
        metavar="STEP",
        help="train nothing: export the product of the run's checkpoint STEP to OUT_DIR/<product>-STEPsteps "
        "(safe while the run is still training)",
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    from pydantic import ValidationError

    from snapgen.cli import CLIError

    from . import checkpoint
    from .config import ConfigError, load_config
    from .distributed import shutdown
    from .loop import Trainer

    overrides = {}
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    if args.out is not None:
        overrides["out_dir"] = str(args.out)
    try:
        config = load_config(args.config, overrides)
        if config.stage != args.stage:
            raise ConfigError(f"{args.config} is a config for stage {config.stage!r}, not {args.stage!r}")
        # Everything that can be wrong with the inputs fails here, before the first step.
        trainer = Trainer(config, resume=args.resume, at_step=args.export_checkpoint)
    except (ConfigError, ValidationError, FileNotFoundError, ValueError) as e:
        shutdown()
        raise CLIError(str(e)) from None
    if args.export_checkpoint is not None:
        try:
            if trainer.dist.is_main:  # under torchrun every process loads it; one writes
                print(f"{config.stage}: step {trainer.step} exported to {trainer.export_snapshot()}")
        finally:
            shutdown()
        return
    try:
        trainer.run()
    except KeyboardInterrupt:
        latest = checkpoint.latest(config.out_dir)
        where = f"the last complete checkpoint is {latest}" if latest else "no checkpoint was written yet"
        print(f"\nsnapgen train: interrupted at step {trainer.step}; {where}; continue with --resume", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        shutdown()
