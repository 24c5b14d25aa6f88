import numpy as np
import pytest
import torch
from PIL import Image

from ddep.data.transforms import (
    Compose, Normalize, Pad, PhotoMetricDistortion, RandomCrop, RandomHorizontalFlip, RandomResize, ToTensor,
    hsv_to_rgb, rescale_size, rgb_to_hsv, train_transforms,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def sample(h=32, w=64):
    """Image whose red channel encodes the column; mask = column // 8, so alignment is checkable."""
    cols = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    image = np.dstack([cols * 3, np.zeros_like(cols), np.zeros_like(cols)])
    return {"image": Image.fromarray(image), "mask": Image.fromarray(cols // 8), "name": "x"}


def pixels(image):
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())


def test_crop_cuts_at_most_the_crop_size():
    out = RandomCrop(48)(sample(32, 40))  # smaller than the crop: kept whole, padded later
    assert out["image"].size == (40, 32) and out["mask"].size == (40, 32) and out["name"] == "x"
    assert RandomCrop((16, 24))(sample())["image"].size == (24, 16)


def test_train_pipeline_pads_after_normalisation_with_zero_and_ignore():
    s = sample(20, 30)
    s["image"] = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    expected = Normalize(MEAN, STD)(ToTensor()(s))
    flips = set()
    for seed in range(6):
        torch.manual_seed(seed)
        out = train_transforms(48, MEAN, STD, ratio_range=(1.0, 1.0))(s)
        assert out["image"].shape == (3, 48, 48) and out["mask"].shape == (48, 48)
        padded = torch.ones(48, 48, dtype=torch.bool)
        padded[:20, :30] = False  # bottom and right, as mmseg's stack_batch
        assert torch.all(out["image"][:, padded] == 0.0)  # the mean colour, not black (about -2.1 here)
        assert torch.all(out["mask"][padded] == 255)
        image, mask = out["image"][:, :20, :30], out["mask"][:20, :30]
        flipped = not torch.equal(image, expected["image"])
        assert torch.equal(image, expected["image"].flip(-1) if flipped else expected["image"])
        assert torch.equal(mask, expected["mask"].flip(-1) if flipped else expected["mask"])
        flips.add(flipped)
    assert flips == {False, True}
    assert Pad(8)(expected) is expected  # nothing to pad


def test_flip_and_crop_keep_image_and_mask_aligned():
    pipeline = Compose([RandomHorizontalFlip(1.0), RandomCrop((16, 24)), ToTensor()])
    for _ in range(5):
        out = pipeline(sample())
        column = (out["image"][0] * 255 / 3).round().long()
        assert torch.equal(column // 8, out["mask"])
    flipped = ToTensor()(RandomHorizontalFlip(1.0)(sample()))
    assert flipped["mask"][0, 0].item() == 7 and flipped["mask"][0, -1].item() == 0


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    s = sample(8, 64)
    cols = np.arange(64)
    row = np.where(cols < 48, 0, 1 + cols % 2)  # class 0, then classes 1 and 2 alternating
    row[40:43] = 255
    mask = np.tile(row, (8, 1)).astype(np.uint8)
    s["mask"] = Image.fromarray(mask)

    def ok(left):  # mmseg's rule, written independently
        labels = mask[:, left:left + 8]
        _, counts = np.unique(labels[labels != 255], return_counts=True)
        return len(counts) > 1 and counts.max() / counts.sum() < 0.75

    # left 40: class 0 alone (ignore aside); 41: 5 of 6 labeled (5 of 8 if 255 counted); 42: 5 of 7
    assert [left for left in range(57) if ok(left)] == list(range(42, 57))
    crop = RandomCrop(8, cat_max_ratio=0.75)
    assert all(crop.balanced(mask, (left, 0, left + 8, 8)) == ok(left) for left in range(57))
    later = 0
    for seed in range(30):
        torch.manual_seed(seed)
        left = int(np.asarray(crop(s)["image"])[0, 0, 0]) // 3
        torch.manual_seed(seed)
        draws = [crop.box(64, 8)[0] for _ in range(11)]  # the first and up to 10 redraws
        assert left == next((d for d in draws[:10] if ok(d)), draws[10])  # the 11th is kept unchecked
        assert ok(left) or not any(ok(d) for d in draws)
        later += left != draws[0]
        torch.manual_seed(seed)
        assert int(np.asarray(RandomCrop(8, 1.0)(s)["image"])[0, 0, 0]) // 3 == draws[0]  # off: the first crop
    assert later >= 15  # one crop in four is balanced, so most seeds redraw
    with pytest.raises(ValueError, match="cat_max_ratio"):
        RandomCrop(8, 0.0)


def test_rescale_size_is_mmcvs_rule():
    assert rescale_size(32, 64, (2048, 512)) == (512, 1024)  # short side to 512
    assert rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)  # Cityscapes unchanged
    assert rescale_size(375, 500, (520, 520)) == (390, 520)  # factor 1.04
    assert rescale_size(10, 13, None, 1.5) == (15, 19)  # box (int(19.5), 15): 19, not round(19.5) = 20
    assert rescale_size(4, 5, (100, 2)) == (2, 3)  # int(2.5 + 0.5) = 3, where round(2.5) = 2


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


def test_photometric_steps_by_hand():
    values = torch.tensor([[[0, 10, 250], [255, 128, 1]]], dtype=torch.uint8)
    # float32, clipped to [0, 255], truncated: 10 + 10.7 = 20.7 -> 20, 250 + 10.7 -> 255
    assert PhotoMetricDistortion.brightness(values, 10.7).tolist() == [[[10, 20, 255], [255, 138, 11]]]
    assert PhotoMetricDistortion.brightness(values, -10.7).tolist() == [[[0, 0, 239], [244, 117, 0]]]
    assert PhotoMetricDistortion.contrast(values, 1.5).tolist() == [[[0, 15, 255], [255, 192, 1]]]
    colours = torch.tensor([[[255, 0, 0], [255, 128, 0], [128, 128, 128], [0, 0, 255]]], dtype=torch.uint8)
    # OpenCV's 8-bit HSV: H in [0, 180), orange's H = round(30 * 128 / 255) = 15, blue's 120
    assert rgb_to_hsv(colours).tolist() == [[[0, 255, 255], [15, 255, 255], [0, 0, 128], [120, 255, 255]]]
    # back, truncating as OpenCV's vectorised path: orange's G = 255 * 15/30 = 127.5 -> 127
    assert hsv_to_rgb(rgb_to_hsv(colours)).tolist() == [[[255, 0, 0], [255, 127, 0], [128, 128, 128], [0, 0, 255]]]
    red = colours[:, :1]
    assert PhotoMetricDistortion.hue(red, 60).tolist() == [[[0, 255, 0]]]  # +120 degrees: green
    assert PhotoMetricDistortion.hue(red, 17).tolist() == [[[255, 144, 0]]]  # G = 255 * 17/30 = 144.5 -> 144
    # (0 - 30) mod 180 = 150, magenta; 150 * float32(1/30) = 5.0000005, so B = 255 * (1 - 5e-7) -> 254
    assert PhotoMetricDistortion.hue(red, -30).tolist() == [[[255, 0, 254]]]
    # S 255 * 0.5 = 127.5 -> 127, back to RGB: 255 * (1 - 127/255) = 128 less a float32 ulp -> 127
    assert PhotoMetricDistortion.saturation(red, 0.5).tolist() == [[[255, 127, 127]]]
    grey = colours[:, 2:3]
    assert torch.equal(PhotoMetricDistortion.saturation(grey, 1.5), grey)


def test_photometric_distortion_draws_in_mmsegs_order():
    s = sample()
    s["image"] = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8))
    P = PhotoMetricDistortion
    changed = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out = P()(s)
        assert out["mask"] is s["mask"] and out["name"] == "x"
        assert out["image"].mode == "RGB" and out["image"].size == (64, 32)
        torch.manual_seed(seed)
        again = P()(s)
        assert np.array_equal(np.asarray(out["image"]), np.asarray(again["image"]))  # seeded: deterministic

        torch.manual_seed(seed)  # the draws by hand: coin, value; contrast second or last
        coin = lambda: bool(torch.randint(2, ()).item())  # noqa: E731
        uniform = lambda low, high: low + (high - low) * torch.rand(()).item()  # noqa: E731
        x = pixels(s["image"])
        if coin():
            x = P.brightness(x, uniform(-32, 32))
        contrast_first = coin()
        if contrast_first and coin():
            x = P.contrast(x, uniform(0.5, 1.5))
        if coin():
            x = P.saturation(x, uniform(0.5, 1.5))
        if coin():
            x = P.hue(x, int(torch.randint(-18, 18, ()).item()))
        if not contrast_first and coin():
            x = P.contrast(x, uniform(0.5, 1.5))
        assert torch.equal(pixels(out["image"]), x)
        changed += not torch.equal(x, pixels(s["image"]))
    assert changed >= 6


def test_preset_pipelines():
    from ddep.data.transforms import CROP_PRESETS, eval_transforms, pretrain_transforms

    assert CROP_PRESETS == {"cityscapes": 1024, "ade20k": 512, "pascal_context": 512, "pretrain": 224}
    torch.manual_seed(0)
    for _ in range(4):
        out = train_transforms(24, (0.5,) * 3, (0.5,) * 3, cat_max_ratio=0.75, photometric=True)(sample())
        assert out["image"].shape == (3, 24, 24) and out["mask"].shape == (24, 24)
        assert out["image"].min() >= -1 and out["image"].max() <= 1
    evaluated = eval_transforms((0.5,) * 3, (0.5,) * 3)(sample())
    assert evaluated["image"].shape == (3, 32, 64) and torch.equal(evaluated["mask"], ToTensor()(sample())["mask"])
    view = pretrain_transforms(16)({"image": sample()["image"]})
    assert view["image"].shape == (3, 16, 16) and 0 <= view["image"].min() and view["image"].max() <= 1
    with pytest.raises(ValueError, match="for unlabeled images"):
        pretrain_transforms(16)(sample())
