import numpy as np
import pytest
import torch
from PIL import Image

from ddep.data.transforms import (
    Compose, Normalize, PhotometricJitter, RandomCrop, RandomHorizontalFlip, RandomResize, ToTensor,
)


def sample(h=32, w=64):
    """Image whose red channel encodes the column; mask = column // 8, so alignment is checkable."""
    cols = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    image = np.dstack([cols * 3, np.zeros_like(cols), np.zeros_like(cols)])
    return {"image": Image.fromarray(image), "mask": Image.fromarray(cols // 8), "name": "x"}


def test_crop_pads_image_with_zero_and_mask_with_ignore():
    out = ToTensor()(RandomCrop(48)(sample(32, 40)))
    assert out["image"].shape == (3, 48, 48) and out["mask"].shape == (48, 48)
    padded = out["mask"] == 255
    assert padded.sum() == 48 * 48 - 32 * 40
    assert torch.all(out["image"][:, padded] == 0)
    assert out["name"] == "x"


def test_flip_and_crop_keep_image_and_mask_aligned():
    pipeline = Compose([RandomHorizontalFlip(1.0), RandomCrop((16, 24)), ToTensor()])
    for _ in range(5):
        out = pipeline(sample())
        column = (out["image"][0] * 255 / 3).round().long()
        assert torch.equal(column // 8, out["mask"])
    flipped = ToTensor()(RandomHorizontalFlip(1.0)(sample()))
    assert flipped["mask"][0, 0].item() == 7 and flipped["mask"][0, -1].item() == 0


def test_random_resize_ratio_and_scale():
    torch.manual_seed(0)
    sizes = [RandomResize((0.5, 2.0))(sample())["image"].size for _ in range(50)]
    assert all(32 <= w <= 128 and abs(w / h - 2) < 0.1 for w, h in sizes)
    assert len(set(sizes)) > 10
    # mmseg-style: fit inside (2048, 512), then ratio 1 -> the short side becomes 512
    fitted = RandomResize((1.0, 1.0), scale=(2048, 512))(sample(32, 64))
    assert fitted["image"].size == (1024, 512) and fitted["mask"].size == (1024, 512)
    assert set(np.unique(np.asarray(fitted["mask"]))) == set(range(8))  # nearest: no new ids
    with pytest.raises(ValueError, match="ratio_range"):
        RandomResize((2.0, 1.0))


def test_to_tensor_and_normalize():
    out = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(ToTensor()(sample()))
    assert out["image"].dtype == torch.float32 and out["mask"].dtype == torch.int64
    # red = 3 * column / 255; column 0 -> (0 - 0.5) / 0.25 = -2
    assert out["image"][0, 0, 0].item() == pytest.approx(-2.0)
    assert out["image"][0, 0, 10].item() == pytest.approx((30 / 255 - 0.5) / 0.25)


def test_photometric_jitter_changes_only_the_image():
    torch.manual_seed(0)
    s = sample()
    s["image"] = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8))
    out = PhotometricJitter()(s)
    assert out["mask"] is s["mask"]
    assert not np.array_equal(np.asarray(out["image"]), np.asarray(s["image"]))


def test_preset_pipelines():
    from ddep.data.transforms import CROP_PRESETS, eval_transforms, pretrain_transforms, train_transforms

    assert CROP_PRESETS == {"cityscapes": 1024, "ade20k": 512, "pascal_context": 512, "pretrain": 224}
    out = train_transforms(24, (0.5,) * 3, (0.5,) * 3, jitter=True)(sample())
    assert out["image"].shape == (3, 24, 24) and out["mask"].shape == (24, 24)
    assert out["image"].min() >= -1 and out["image"].max() <= 1
    evaluated = eval_transforms((0.5,) * 3, (0.5,) * 3)(sample())
    assert evaluated["image"].shape == (3, 32, 64) and torch.equal(evaluated["mask"], ToTensor()(sample())["mask"])
    view = pretrain_transforms(16)({"image": sample()["image"]})
    assert view["image"].shape == (3, 16, 16) and 0 <= view["image"].min() and view["image"].max() <= 1
    with pytest.raises(ValueError, match="for unlabeled images"):
        pretrain_transforms(16)(sample())
