"""Data sources and the step-addressable order that makes resume exact."""

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import ConfigError, DataConfig
from training.data import StepBatchSampler, build_dataset, collate, fit, make_loader


def _png(color, size=(48, 40)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_sampler_resumes_mid_epoch_and_ranks_split_the_global_batch():
    straight = list(itertools.islice(iter(StepBatchSampler(10, 2, seed=3)), 12))
    resumed = list(itertools.islice(iter(StepBatchSampler(10, 2, seed=3, start_step=7)), 5))
    assert resumed == straight[7:12]
    # Each epoch is a permutation; epochs differ.
    assert sorted(i for b in straight[:5] for i, _ in b) == list(range(10))
    assert [i for b in straight[:5] for i, _ in b] != [i for b in straight[5:10] for i, _ in b]
    ranks = [list(itertools.islice(iter(StepBatchSampler(10, 2, seed=3, rank=r, world=2)), 2)) for r in (0, 1)]
    step0 = {i for r in ranks for i, _ in r[0]}
    assert len(step0) == 4  # disjoint slices of one global batch
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        StepBatchSampler(3, 2, seed=0, world=2)


def test_fit_resizes_shorter_side_then_crops():
    x = fit(_png((255, 0, 0), (80, 40)), 32)
    assert x.shape == (3, 32, 32) and torch.allclose(x[0], torch.ones(32, 32))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    t = torch.rand(3, 40, 60) * 2 - 1
    a = fit(t, 32, g1, random_crop=True, random_flip=True)
    assert torch.equal(a, fit(t, 32, g2, random_crop=True, random_flip=True))


def test_image_folder_captions_and_labels(tmp_path):
    (tmp_path / "cats").mkdir()
    _png((255, 0, 0)).save(tmp_path / "cats" / "a.png")
    _png((0, 255, 0)).save(tmp_path / "cats" / "b.jpg")
    (tmp_path / "cats" / "b.txt").write_text("a green picture\n")
    config = DataConfig(kind="folder", path=str(tmp_path), resolution=16, classes=["cats", "a green picture"])
    dataset = build_dataset(config)
    batch = collate([dataset[i] for i in range(2)])
    assert batch["captions"] == ["cats", "a green picture"]
    assert batch["labels"].tolist() == [0, 1]
    assert batch["pixels"].shape == (2, 3, 16, 16) and batch["pixels"].min() >= -1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        build_dataset(DataConfig(kind="folder", path=str(tmp_path / "empty")))


@pytest.fixture
def shards(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(0)
    for s in range(4):
        with wds.TarWriter(str(tmp_path / f"shard-{s:02d}.tar")) as sink:
            for i in range(6):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": f"{s}-{i}", "png": buf.getvalue(), "txt": f"shard {s} item {i}"})
    return str(tmp_path / "shard-{00..03}.tar")


def test_webdataset_stream_is_resumable_and_sharded(shards):
    config = DataConfig(kind="webdataset", path=shards, resolution=16, shuffle_buffer=4, random_crop=True)

    def captions(start_step, steps, rank=0, world=1):
        loader = make_loader(build_dataset(config), 3, seed=5, rank=rank, world=world, start_step=start_step,
                             num_workers=0)
        return [b["captions"] for b in itertools.islice(iter(loader), steps)]

    straight = captions(0, 12)  # 24 samples per epoch: 8 batches, then a reshuffled epoch
    assert captions(5, 7) == straight[5:]
    assert len({c for b in straight[:8] for c in b}) == 24
    ranks = [set(sum(captions(0, 4, rank=r, world=2), [])) for r in (0, 1)]
    assert not ranks[0] & ranks[1]
    with pytest.raises(ConfigError, match="not found"):
        build_dataset(DataConfig(kind="webdataset", path=shards.replace("03", "09")))
