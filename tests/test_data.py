"""Datasets: registry, on-disk cache, calibration split, device-side augmentation."""
import numpy as np
import pytest
import torch

from lmcx.config import DataConfig, SyntheticConfig
from lmcx.data import augment, epoch_generator, load_arrays, load_dataset, train_batches
from lmcx.errors import LmcxError


def test_digits_is_embedded_and_split():
    ds = load_dataset(DataConfig(name="digits", calib_size=200))
    assert ds.in_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.max() > 200
    assert len(ds.y_train) + len(ds.y_calib) == 1437 and len(ds.y_calib) == 200 and len(ds.y_test) == 360


def test_calibration_split_is_fixed_and_disjoint():
    cfg = DataConfig(name="synthetic", calib_size=100, synthetic=SyntheticConfig(train_size=400))
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert torch.equal(a.x_calib, b.x_calib)
    rows = lambda x: {bytes(r.numpy()) for r in x.flatten(1)}  # noqa: E731
    assert not rows(a.x_calib) & rows(a.x_train)
    assert len(a.y_train) == 300


def test_train_size_limits_training_set():
    cfg = DataConfig(name="synthetic", calib_size=10, train_size=50)
    assert len(load_dataset(cfg).y_train) == 50


def test_calib_size_too_large():
    with pytest.raises(LmcxError, match="calib_size"):
        load_dataset(DataConfig(name="synthetic", calib_size=5000))


def test_normalisation_standardises_training_pixels():
    ds = load_dataset(DataConfig(name="synthetic", calib_size=0))
    x = ds.normalize(ds.x_train)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2


def test_default_calibration_split_is_a_third_of_a_small_set_at_most_5000():
    from lmcx.data import default_calib_size

    assert len(load_dataset(DataConfig(name="digits")).y_calib) == 1437 // 3 == 479
    assert default_calib_size(55_000) == 5000 and default_calib_size(60) == 20


def test_standard_normalisation_uses_the_published_constants_and_is_recorded(tmp_path, monkeypatch):
    """data.normalization: standard on MNIST (a stand-in loader: no download in tests) uses MNIST's
    published mean/std, and the checkpoint and meta.json say so; datasets without published constants
    are refused with the setting's name."""
    import json

    from lmcx import data
    from lmcx.checkpoint import load_checkpoint
    from lmcx.config import ModelConfig, TrainConfig, TrainJob, validate
    from lmcx.train import train
    from lmcx.validation import STANDARD_NORMALIZATION

    assert set(STANDARD_NORMALIZATION) == set(data.STANDARD_STATS)
    blobs = data._load_synthetic(DataConfig(name="synthetic", synthetic=SyntheticConfig(  # MNIST-shaped
        train_size=256, test_size=64, num_classes=10, shape=[1, 28, 28])), tmp_path)
    monkeypatch.setitem(data.DATASETS, "mnist", lambda cfg, root: blobs)
    monkeypatch.setenv("LMCX_CACHE_DIR", str(tmp_path / "cache"))  # the stand-in must not be cached for others
    cfg = DataConfig(name="mnist", calib_size=32, normalization="standard")
    ds = load_dataset(cfg)
    assert ds.mean.tolist() == pytest.approx([0.1307]) and ds.std.tolist() == pytest.approx([0.3081])
    assert not torch.allclose(ds.mean, load_dataset(DataConfig(name="mnist", calib_size=32)).mean)
    job = TrainJob(data=cfg, model=ModelConfig(width=1 / 32, norm="none"),
                   train=TrainConfig(optimizer="adam", lr=1e-3, epochs=1, batch_size=64, warmup_epochs=0), device="cpu")
    train(job, tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.data.normalization == "standard"
    recorded = ckpt.info["preprocessing"]
    assert recorded["normalization"] == "standard" and recorded["mean"] == [0.1307] and recorded["calib_size"] == 32
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["preprocessing"] == recorded
    with pytest.raises(LmcxError, match="data.normalization.*'digits'"):
        validate(DataConfig(name="digits", normalization="standard"), "data.")


def test_augment_crops_and_flips_exactly():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    gen = torch.Generator().manual_seed(0)
    out = augment(x, 0, gen)  # no padding: either identity or a horizontal flip per image
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    out = augment(x, 2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    # every output row is a (possibly flipped, shifted) window of the zero-padded input
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy:dy + 4, dx:dx + 4] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)


def test_batches_cover_every_image_once_and_shard_under_ddp():
    ds = load_dataset(DataConfig(name="synthetic", calib_size=0, synthetic=SyntheticConfig(train_size=100)))
    seen = torch.cat([y for _, y in train_batches(ds, 32, epoch_generator(0, 0))])
    assert len(seen) == 100
    ranks = [torch.cat([y for _, y in train_batches(ds, 32, epoch_generator(0, 0), rank=r, world_size=2)])
             for r in range(2)]
    assert sorted((ranks[0].tolist() + ranks[1].tolist())) == sorted(seen.tolist())


def test_unknown_dataset():
    cfg = DataConfig()
    cfg.name = "imagenet"
    with pytest.raises(LmcxError, match="unknown dataset 'imagenet'"):
        load_arrays(cfg)


def test_missing_torchvision_dataset_without_download(tmp_path):
    with pytest.raises(LmcxError, match="mnist not found under .*download=true"):
        load_arrays(DataConfig(name="mnist", root=str(tmp_path)))


def _write_imagefolder(root, sizes=((4, 4),)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = sizes[i % len(sizes)]
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_imagefolder_is_decoded_once_and_cached(tmp_path, monkeypatch):
    _write_imagefolder(tmp_path / "tree")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), path="tree", calib_size=2)
    first = load_arrays(cfg)
    assert first.x_train.shape == (12, 3, 4, 4) and first.num_classes == 2
    assert sorted(set(first.y_train.tolist())) == [0, 1]
    import lmcx.data as data

    monkeypatch.setitem(data.DATASETS, "imagefolder", lambda *a: pytest.fail("decoded twice"))
    second = load_arrays(cfg)
    assert np.array_equal(first.x_train, second.x_train)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(LmcxError, match="is not a directory"):
        load_arrays(DataConfig(name="imagefolder", root=str(tmp_path), path="nothing"))
    _write_imagefolder(tmp_path / "mixed", sizes=((4, 4), (5, 5)))
    with pytest.raises(LmcxError, match="differ in size"):
        load_arrays(DataConfig(name="imagefolder", root=str(tmp_path), path="mixed"))


def test_subsets_of_class_ordered_data_hold_every_class(tmp_path):
    """Image folders are read class by class: train_size and every first-N subset must still be balanced."""
    _write_imagefolder(tmp_path / "tree")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), path="tree", calib_size=2, train_size=4)
    ds = load_dataset(cfg)
    assert sorted(set(ds.y_train.tolist())) == [0, 1]
    arrays = load_arrays(cfg)
    assert set(arrays.y_train[:4].tolist()) == {0, 1}

