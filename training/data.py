"""Training data, in one place: image folders with .txt captions, WebDataset shards, ShapesBench.

Every source yields items ``{"pixels": (3, R, R) float in [-1, 1], "caption": str, "label": int?,
"index": int?}`` at the run's current resolution; :func:`collate` turns a list of items into the
stage's ``Batch`` (``pixels``, ``captions``, ``labels``, ``indices``).

Exact resumption: the order of examples is a pure function of (seed, step, rank), never of the
loader's history. For map-style sources (folder, shapes) :class:`StepBatchSampler` draws one
permutation per epoch from ``seed + epoch`` and deals global batch ``k`` out across the ranks;
each index travels with its own augmentation seed, so random crops don't depend on which worker
loads them. WebDataset shards are a stream: :class:`ShardStream` deals shards out per (rank,
worker stream) with seeded shuffles, and a resumed stream skips the samples it already served
(undecoded), so resuming gives the same batches as long as the world size and ``num_workers``
are the same.
"""

from __future__ import annotations

import glob
import io
import itertools
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .config import ConfigError, DataConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WDS_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
WDS_CAPTION_KEYS = ("txt", "caption")
EVAL_SEED_OFFSET = 1_000_003  # ShapesBench scenes for evaluation: a seed no training config uses


# --------------------------------------------------------------------------------------------
# Pixels: decode, resize, crop
# --------------------------------------------------------------------------------------------


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def fit(
    pixels: torch.Tensor | Image.Image,
    resolution: int,
    generator: torch.Generator | None = None,
    random_crop: bool = False,
    random_flip: bool = False,
) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` and crop a square: centred, or random (and
    randomly mirrored) from ``generator``.

    PIL images are resized before they become tensors (decoding a 4k JPEG into a float tensor
    first would cost 16x the memory traffic).
    """
    if isinstance(pixels, Image.Image):
        w, h = pixels.size
        scale = resolution / min(w, h)
        if scale != 1.0:
            size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
            pixels = pixels.convert("RGB").resize(size, Image.BICUBIC, reducing_gap=3.0)
        pixels = pil_to_tensor(pixels)
    h, w = pixels.shape[-2:]
    scale = resolution / min(h, w)
    if scale != 1.0:
        size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
        pixels = F.interpolate(pixels[None], size=size, mode="bicubic", antialias=True)[0].clamp(-1, 1)
        h, w = size
    if random_crop:
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
    else:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    pixels = pixels[:, top : top + resolution, left : left + resolution]
    if random_flip and bool(torch.rand((), generator=generator) < 0.5):
        pixels = pixels.flip(-1)
    return pixels.contiguous()


# --------------------------------------------------------------------------------------------
# Map-style sources
# --------------------------------------------------------------------------------------------


class ImageFolder(Dataset):
    """Images under ``root`` (recursive, sorted); caption from ``NAME.txt`` next to ``NAME.png``,
    else the parent directory's name (so an ImageNet-style tree gives class-name captions)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"data.path {self.root}: no such directory")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ConfigError(f"data.path {self.root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int) -> str:
        path = self.files[index]
        text = path.with_suffix(".txt")
        return text.read_text(encoding="utf-8").strip() if text.is_file() else path.parent.name

    def __getitem__(self, index: int) -> dict[str, Any]:
        with Image.open(self.files[index]) as image:
            image.load()
            return {"image": image, "caption": self.caption(index)}


class TrainingView(Dataset):
    """A map-style source at one resolution, with labels and seeded augmentation.

    Keys are ``index`` or ``(index, augmentation_seed)`` (what :class:`StepBatchSampler` yields).
    """

    def __init__(self, source: Dataset, config: DataConfig, resolution: int):
        self.source = source
        self.resolution = resolution
        self.random_crop = config.random_crop
        self.random_flip = config.random_flip
        self.classes = {name: i for i, name in enumerate(config.classes)} if config.classes else None

    @property
    def deterministic(self) -> bool:
        """True when item ``i`` is the same every time (so its latent can be cached)."""
        return not (self.random_crop or self.random_flip)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        item = self.source[index]
        image = item["image"] if "image" in item else item["pixels"]
        generator = torch.Generator().manual_seed(seed)
        pixels = fit(image, self.resolution, generator, self.random_crop, self.random_flip)
        out = {"pixels": pixels, "caption": item["caption"], "index": index}
        if self.classes is not None:
            out["label"] = class_index(self.classes, item["caption"])
        return out


def class_index(classes: dict[str, int], caption: str) -> int:
    if caption not in classes:
        raise ValueError(f"caption {caption!r} is not one of data.classes; class-conditional items need a known class")
    return classes[caption]


def build_source(config: DataConfig, split: str = "train") -> Dataset | None:
    """The raw map-style source (None for webdataset, which streams). Checks paths now."""
    if config.kind == "folder":
        return ImageFolder(config.path)
    if config.kind == "shapes":
        from .shapesbench import ShapesDataset

        return ShapesDataset(config.length, config.seed, split=split, categories=config.categories)
    return None


def build_dataset(config: DataConfig, resolution: int | None = None, split: str = "train") -> Dataset:
    """The training dataset at ``resolution`` (default: the config's first resolution)."""
    resolution = resolution or config.resolution_at(0)
    if config.kind == "webdataset":
        return ShardStream(config, resolution)
    return TrainingView(build_source(config, split), config, resolution)


def build_eval_dataset(config: DataConfig, resolution: int) -> Dataset:
    """Images to evaluate reconstructions on: for ShapesBench unseen scenes of the training
    distribution (another seed); otherwise the training source, unaugmented."""
    if config.kind == "shapes":
        config = config.model_copy(update={"seed": config.seed + EVAL_SEED_OFFSET})
    return build_dataset(config.model_copy(update={"random_crop": False, "random_flip": False}), resolution)


# --------------------------------------------------------------------------------------------
# Order: seeded, step-addressable batches
# --------------------------------------------------------------------------------------------


def item_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (SeedSequence hashes them; cheap and portable)."""
    return int(np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1)[0])


class StepBatchSampler:
    """Global batch ``k`` = positions ``[k G, (k + 1) G)`` of epoch ``k // steps_per_epoch``'s
    permutation, ``G = batch_size x world``; rank ``r`` takes its ``batch_size`` slice.

    Infinite; starts at ``start_step``. Yields lists of ``(index, augmentation_seed)``.
    """

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start_step: int = 0):
        self.global_batch = batch_size * world
        if length < self.global_batch:
            raise ConfigError(
                f"the dataset has {length} items, fewer than one global batch "
                f"({batch_size} per process x {world} processes)"
            )
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world, self.start_step = rank, world, start_step
        self.steps_per_epoch = length // self.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = divmod(self.start_step, self.steps_per_epoch)
        while True:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for k in range(offset, self.steps_per_epoch):
                start = k * self.global_batch + self.rank * self.batch_size
                yield [(i, item_seed(self.seed, epoch, i)) for i in order[start : start + self.batch_size]]
            epoch, offset = epoch + 1, 0


# --------------------------------------------------------------------------------------------
# WebDataset shards
# --------------------------------------------------------------------------------------------


def expand_shards(pattern: str) -> list[str]:
    """Brace patterns ("a-{000..009}.tar"), globs, or several of either separated by '::'."""
    from braceexpand import braceexpand

    urls: list[str] = []
    for part in pattern.split("::"):
        for url in braceexpand(part):
            is_local = "://" not in url and not url.startswith("pipe:")
            if is_local and any(c in url for c in "*?["):
                urls += sorted(glob.glob(url))
            elif is_local and not Path(url).is_file():
                raise ConfigError(f"data.path: shard {url} not found")
            else:
                urls.append(url)
    if not urls:
        raise ConfigError(f"data.path {pattern!r}: no shards found")
    return urls


class ShardStream(IterableDataset):
    """WebDataset tar shards as an infinite stream of collated batches (see the module docstring).

    Samples are grouped by key as WebDataset does (``000123.png`` + ``000123.txt``); an image
    from the first of png/jpg/jpeg/webp, the caption from txt (or json["caption"]), a class from
    ``cls`` when present. Samples without an image or caption are skipped.
    """

    def __init__(self, config: DataConfig, resolution: int):
        self.config = config
        self.resolution = resolution
        self.urls = expand_shards(config.path)
        self.classes = {name: i for i, name in enumerate(config.classes)} if config.classes else None
        self.configure(batch_size=1, seed=0)

    deterministic = False  # a stream has no stable index to cache latents by

    def configure(self, batch_size: int, seed: int, rank: int = 0, world: int = 1, start_step: int = 0) -> None:
        self.batch_size, self.seed, self.rank, self.world, self.start_step = batch_size, seed, rank, world, start_step

    def _raw(self, stream: int, streams: int) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        slots = self.world * streams
        if len(self.urls) < slots:
            raise ConfigError(
                f"{len(self.urls)} shard(s) cannot feed {self.world} process(es) x {streams} loader worker(s); "
                "write more shards or lower num_workers"
            )
        slot = self.rank * streams + stream
        for epoch in itertools.count():
            order = torch.randperm(len(self.urls), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            mine = [self.urls[i] for pos, i in enumerate(order) if pos % slots == slot]
            rng = random.Random(item_seed(self.seed, epoch, self.rank, stream))
            buffer: list[dict[str, Any]] = []
            for sample in wds.tarfile_samples([{"url": u} for u in mine]):
                if not any(k in sample for k in WDS_IMAGE_KEYS):
                    continue
                buffer.append(sample)
                if len(buffer) >= self.config.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
            rng.shuffle(buffer)
            yield from buffer

    def _decode(self, sample: dict[str, Any], seed: int) -> dict[str, Any]:
        key = next(k for k in WDS_IMAGE_KEYS if k in sample)
        with Image.open(io.BytesIO(sample[key])) as image:
            image.load()
        text_key = next((k for k in WDS_CAPTION_KEYS if k in sample), None)
        if text_key is not None:
            caption = sample[text_key].decode("utf-8").strip()
        elif "json" in sample:
            import json

            caption = str(json.loads(sample["json"]).get("caption", ""))
        else:
            caption = ""
        generator = torch.Generator().manual_seed(seed)
        pixels = fit(image, self.resolution, generator, self.config.random_crop, self.config.random_flip)
        item = {"pixels": pixels, "caption": caption}
        if self.classes is not None:
            item["label"] = (
                int(sample["cls"].decode()) if "cls" in sample else class_index(self.classes, caption)
            )
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # The loader takes batches from its workers round-robin, starting at worker 0, so after
        # a restart at ``start_step`` worker w serves global batches start_step + w + j * workers:
        # it plays stream (start_step + w) mod workers, which already served the batches below.
        stream = (self.start_step + worker) % workers
        served = max(0, math.ceil((self.start_step - stream) / workers))
        samples = itertools.islice(self._raw(stream, workers), served * self.batch_size, None)
        for k in itertools.count(served):
            chunk = list(itertools.islice(samples, self.batch_size))
            step = stream + k * workers
            yield collate([self._decode(s, item_seed(self.seed, step, self.rank, i)) for i, s in enumerate(chunk)])


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

_PLURAL = {"caption": "captions", "label": "labels", "index": "indices", "text_id": "text_ids"}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items -> a ``Batch``: tensors stacked, ints to a long tensor, strings to a list."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        name = _PLURAL.get(key, key)
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[name] = torch.tensor(values, dtype=torch.long)
        else:
            batch[name] = values
    return batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    rank: int,
    world: int,
    start_step: int,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """An infinite loader whose first batch is global batch ``start_step``."""
    # The loader draws its workers' base seed from this generator, not from torch's global RNG,
    # which the training step owns (restoring it on resume must give the same noise).
    generator = torch.Generator().manual_seed(seed)
    common = dict(num_workers=num_workers, pin_memory=pin_memory, generator=generator,
                  persistent_workers=num_workers > 0)
    if isinstance(dataset, ShardStream):
        dataset.configure(batch_size, seed, rank, world, start_step)
        return DataLoader(dataset, batch_size=None, **common)
    sampler = StepBatchSampler(len(dataset), batch_size, seed, rank, world, start_step)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **common)


def fixed_batch(dataset: Dataset, size: int) -> dict[str, Any]:
    """The first ``size`` items, unaugmented: a fixed batch for evaluation and statistics."""
    if isinstance(dataset, ShardStream):
        dataset.configure(batch_size=size, seed=0)
        return next(iter(dataset))
    if len(dataset) < size:
        size = len(dataset)
    return collate([dataset[i] for i in range(size)])
