"""A text encoder that looks its prompts up in a saved table instead of running a network.

Where an encoder's weights cannot travel (a lent GPU machine takes a 64 MiB working tree and
reaches no network; MiniLM's weights are 87 MB), the embeddings of every prompt a run will see
are computed here once, by the real encoder, and saved:

    python -m training.text_table OUT.safetensors --encoder minilm:layers=0,6 --config CONFIG.yaml ...

A recipe config then names ``text_encoder: table:OUT.safetensors``. :class:`TableTextEncoder`
answers ``encode`` for exactly the saved prompts (the encoder's tokens rounded to fp16, the
padding positions zero, which every consumer masks) and refuses any other prompt. Its config is
the source encoder's, so a model trained with the table is saved with the real encoder and
runs anywhere that encoder is installed.

The file holds each prompt's real tokens only, back to back (``tokens``, rows ``offsets[i]`` to
``offsets[i + 1]``), ``pooled`` if the encoder has it, and in its metadata the prompts, the
source encoder's config and ``max_length``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from snapgen.text import TextEmbeddings, TextEncoder, _check_prompts

CHUNK = 64  # prompts per encoder call while building


class PromptNotInTableError(ValueError):
    pass


class TableTextEncoder(TextEncoder):
    """The embeddings :func:`build_text_table` saved, served as a :class:`snapgen.text.TextEncoder`."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"text table not found: {self.path}")
        with safe_open(self.path, "pt") as f:
            meta, names = f.metadata() or {}, f.keys()
            tensors = {k: f.get_tensor(k) for k in names}
        try:
            prompts = json.loads(meta["prompts"])
            self.source_config = json.loads(meta["encoder"])
            self.max_length = int(meta["max_length"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{self.path} is not a text table (metadata {e} missing or bad)") from None
        self.row = {prompt: i for i, prompt in enumerate(prompts)}
        self.offsets = tensors["offsets"].tolist()
        # Buffers, so .to(device) moves them; the table stays fp16 and is cast on the way out.
        self.register_buffer("tokens", tensors["tokens"], persistent=False)
        self.register_buffer("pooled", tensors.get("pooled"), persistent=False)
        self.token_dim = int(self.tokens.shape[1])
        self.pooled_dim = None if self.pooled is None else int(self.pooled.shape[1])

    def count_tokens(self, prompts: list[str]) -> list[int]:
        rows = self._rows(_check_prompts(prompts))
        return [self.offsets[r + 1] - self.offsets[r] for r in rows]

    def _rows(self, prompts: list[str]) -> list[int]:
        missing = [p for p in prompts if p not in self.row]
        if missing:
            raise PromptNotInTableError(
                f"prompt {missing[0]!r} is not in the text table {self.path} ({len(self.row)} prompts); "
                "rebuild it with python -m training.text_table, naming the config or prompts that need it"
            )
        return [self.row[p] for p in prompts]

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        rows = self._rows(_check_prompts(prompts))
        device = self.tokens.device
        tokens = torch.zeros(len(rows), self.max_length, self.token_dim, device=device)
        mask = torch.zeros(len(rows), self.max_length, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            start, end = self.offsets[r], self.offsets[r + 1]
            tokens[i, : end - start] = self.tokens[start:end].float()
            mask[i, : end - start] = True
        pooled = None if self.pooled is None else self.pooled[rows].float()
        return TextEmbeddings(tokens=tokens, mask=mask, pooled=pooled)

    def to_config(self) -> dict[str, Any]:
        return self.source_config


@torch.no_grad()
def build_text_table(encoder: TextEncoder, prompts: Iterable[str], path: str | Path) -> Path:
    """Encode each distinct prompt (and "", the unconditional one) with ``encoder``; save to ``path``."""
    unique = sorted(set(prompts) | {""})
    tokens, pooled, offsets = [], [], [0]
    for i in range(0, len(unique), CHUNK):
        emb = encoder.encode(unique[i : i + CHUNK])
        for row in range(emb.tokens.shape[0]):
            real = emb.tokens[row][emb.mask[row]]
            tokens.append(real.half().cpu())
            offsets.append(offsets[-1] + real.shape[0])
        if emb.pooled is not None:
            pooled.append(emb.pooled.half().cpu())
    tensors = {"tokens": torch.cat(tokens).contiguous(), "offsets": torch.tensor(offsets, dtype=torch.int64)}
    if pooled:
        tensors["pooled"] = torch.cat(pooled).contiguous()
    meta = {"prompts": json.dumps(unique), "encoder": json.dumps(encoder.to_config()),
            "max_length": str(encoder.max_length)}  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=meta)
    tmp.replace(path)  # never half a table under the real name
    return path


def config_prompts(config_path: str | Path) -> set[str]:
    """Every caption of the training data a recipe config names (train split), and its stage's
    ``sample_prompts``."""
    from .config import load_config, parse_stage_options
    from .data import build_source
    from .stages import stage_class

    config = load_config(config_path)
    source = build_source(config.data)
    if source is None:
        raise ValueError(f"{config_path}: its data is a stream; list its prompts with --prompts instead")
    if hasattr(source, "scene"):  # ShapesBench: the caption without rendering the picture
        prompts = {source.scene(i).caption for i in range(len(source))}
    else:
        prompts = {source.caption(i) for i in range(len(source))}
    options = parse_stage_options(config, stage_class(config.stage).Options)
    return prompts | set(getattr(options, "sample_prompts", ()))


def main(argv: list[str] | None = None) -> None:
    from .inputs import build_text_encoder

    parser = argparse.ArgumentParser(prog="python -m training.text_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the table to write (.safetensors)")
    parser.add_argument("--encoder", required=True, help="the encoder, as a config's text_encoder names it")
    parser.add_argument("--config", type=Path, action="append", default=[],
                        help="a recipe config whose data's captions (and sample prompts) go in")  # fmt: skip
    parser.add_argument("--prompts", type=Path, help="a file of further prompts, one per line")
    args = parser.parse_args(argv)
    from .config import ConfigError

    prompts: set[str] = set()
    try:
        for config in args.config:
            prompts |= config_prompts(config)
        if args.prompts:
            prompts |= {line.strip() for line in args.prompts.read_text().splitlines() if line.strip()}
        encoder = build_text_encoder(args.encoder)
    except (ConfigError, ValueError, OSError) as e:
        raise SystemExit(f"python -m training.text_table: {e}") from None
    path = build_text_table(encoder, prompts, args.out)
    print(f"{path}: {len(prompts | {''})} prompts, {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
