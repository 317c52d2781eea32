"""The in-memory small-image loader: batched on-device augmentation, determinism, caching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prunekit.data import MemoryLoader, TensorImageDataset, cached_uint8, random_crop_flip
from prunekit.data import memory as memory_mod


def _images(n: int = 10, h: int = 8, w: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g), torch.arange(n) % 3


def test_random_crop_flip_is_a_crop_of_the_padded_image() -> None:
    x, _ = _images(6, 8, 10)
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
    g = torch.Generator().manual_seed(1)
    out = random_crop_flip(x, padding=2, flip=True, generator=g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):  # every output is one of the 5x5 crops, possibly mirrored
        crops = [padded[i, :, dy : dy + 8, dx : dx + 10] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)
    flipped = random_crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(3))
    assert any(
        torch.equal(flipped[i], x[i].flip(-1)) and not torch.equal(x[i], x[i].flip(-1)) for i in range(6)
    )


def test_memory_loader_batches_and_normalisation() -> None:
    x, y = _images(10)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    loader = MemoryLoader(x, y, batch_size=4, mean=mean, std=std, classes=["a", "b", "c"])
    batches = list(loader)
    assert len(loader) == 3 and [len(b[1]) for b in batches] == [4, 4, 2]
    xb, yb = batches[0]
    assert xb.dtype == torch.float32 and xb.shape == (4, 3, 8, 8) and yb.dtype == torch.int64
    expect = (x[:4].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(xb, expect, atol=1e-6) and yb.tolist() == y[:4].tolist()
    raw = next(iter(MemoryLoader(x, y, batch_size=10)))[0]
    assert float(raw.min()) >= 0 and float(raw.max()) <= 1
    assert len(MemoryLoader(x, y, batch_size=4, drop_last=True)) == 2
    assert loader.num_classes == 3


def test_memory_loader_is_deterministic_per_seed_and_epoch() -> None:
    x, y = _images(20)

    def run(seed: int) -> list[torch.Tensor]:
        loader = MemoryLoader(x, y, batch_size=8, shuffle=True, augment=True, seed=seed)
        return [torch.cat([b[0] for b in loader]) for _ in range(2)]  # two epochs

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], a[1])  # the next epoch is shuffled/augmented differently
    assert not torch.equal(a[0], c[0])
    loader = MemoryLoader(x, y, batch_size=8, shuffle=True, seed=0)
    loader.set_epoch(1)
    e1 = torch.cat([b[1] for b in loader])
    loader.set_epoch(1)
    assert torch.equal(e1, torch.cat([b[1] for b in loader]))
    assert sorted(e1.tolist()) == sorted(y.tolist())  # a permutation: every sample once


def test_memory_loader_shards_for_distributed() -> None:
    x, y = _images(10)
    labels = torch.arange(10)
    seen = []
    for rank in range(3):
        loader = MemoryLoader(x, labels, batch_size=2, shuffle=True, seed=5, rank=rank, world_size=3)
        assert loader.num_samples == 4
        seen.append(torch.cat([b[1] for b in loader]).tolist())
    assert set(sum(seen, [])) == set(range(10))  # padded by wrapping, nothing lost


def test_cached_uint8_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _images(5)
    ds = TensorImageDataset(x, y, ["a", "b", "c"], source="test:tensor")
    cache = tmp_path / "c.pt"
    imgs, labels = cached_uint8(ds, cache)
    assert cache.is_file() and torch.equal(imgs, x)

    def boom(*a, **k):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(memory_mod, "decode_all", boom)
    imgs2, labels2 = cached_uint8(ds, cache)
    assert torch.equal(imgs2, x) and torch.equal(labels2, labels)
    monkeypatch.undo()
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "auto"))
    cached_uint8(ds, True)
    assert len(list((tmp_path / "auto" / "images").glob("*.pt"))) == 1
    loader = MemoryLoader.from_dataset(ds, cache=cache, batch_size=5)
    assert loader.classes == ["a", "b", "c"] and len(loader.dataset()) == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memory_loader_on_cuda() -> None:
    x, y = _images(16, 32, 32)
    loader = MemoryLoader(x, y, batch_size=8, shuffle=True, augment=True, device="cuda", seed=0)
    xb, yb = next(iter(loader))
    assert xb.is_cuda and yb.is_cuda and xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32
    again = next(iter(MemoryLoader(x, y, batch_size=8, shuffle=True, augment=True, device="cuda", seed=0)))[0]
    assert torch.equal(xb, again)
