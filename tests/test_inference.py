import json
import math

import pytest
import torch
from torch import nn

from ddep.inference import (
    TTA_SCALES,
    describe_mode,
    predict,
    predict_cityscapes_halves,
    predict_slide,
    predict_tta,
    predict_whole,
    slide_windows,
)

K = 4


def per_pixel_model():
    """A 1x1 conv: translation-equivariant, flip-invariant, blind to image size."""
    torch.manual_seed(0)
    return nn.Conv2d(3, K, kernel_size=1).eval()


class Recorder(nn.Module):
    """Wraps a model and records the (y, x) input size of every call."""

    def __init__(self, model, divisor=None):
        super().__init__()
        self.model, self.divisor, self.sizes = model, divisor, []

    def forward(self, x):
        if self.divisor and (x.shape[-2] % self.divisor or x.shape[-1] % self.divisor):
            raise ValueError(f"sides must be multiples of {self.divisor}; got {tuple(x.shape[-2:])}")
        self.sizes.append(tuple(x.shape[-2:]))
        return self.model(x)


class ColumnRamp(nn.Module):
    """Logits that depend on the absolute column: not flip-invariant, not translation-equivariant."""

    def forward(self, x):
        ramp = torch.linspace(-2, 2, x.shape[-1]).expand(x.shape[0], 1, x.shape[-2], x.shape[-1])
        return torch.cat([ramp, -ramp, x[:, :2]], dim=1)


def image(h=10, w=13, b=2):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))


def close(a, b):
    return torch.allclose(a, b, atol=1e-6)


def test_whole_returns_softmax_at_input_resolution():
    model, x = per_pixel_model(), image()
    probs = predict_whole(model, x)
    assert probs.shape == (2, K, 10, 13) and not probs.requires_grad
    assert close(probs, model(x).softmax(1))
    assert close(probs.sum(1), torch.ones(2, 10, 13))


def test_window_grid_matches_mmsegmentation_formula():
    # H=10, W=13, crop 6x6, stride 4x4: h_grids = (10-6+3)//4+1 = 2, w_grids = (13-6+3)//4+1 = 3;
    # the last row/column are shifted back to end at the edge: y in (0, 4), x in (0, 4, 7).
    windows = slide_windows(10, 13, (6, 6), (4, 4))
    assert windows == [(y, y + 6, x, x + 6) for y in (0, 4) for x in (0, 4, 7)]
    assert slide_windows(10, 13, 6, 4) == windows  # ints mean square
    assert slide_windows(5, 7, (8, 8), (4, 4)) == [(0, 5, 0, 7)]  # image smaller than the crop
    model = Recorder(per_pixel_model())
    predict_slide(model, image(), (6, 6), (4, 4))
    assert model.sizes == [(6, 6)] * 6


def test_slide_with_one_window_covering_the_image_equals_whole():
    model, x = ColumnRamp(), image()  # even a position-dependent model: the window is the image
    assert close(predict_slide(model, x, (10, 13), (5, 5)), predict_whole(model, x))


def test_overlapping_slide_equals_whole_for_a_per_pixel_model():
    model, x = per_pixel_model(), image(17, 23)
    probs = predict_slide(model, x, (8, 6), (3, 5))
    assert close(probs, predict_whole(model, x))
    assert close(probs.sum(1), torch.ones(2, 17, 23))


def test_slide_averages_overlapping_windows():
    # ColumnRamp sees each window's own columns, so overlapping columns get the softmax of the
    # mean of two windows' logits (mmsegmentation averages logits, then takes the softmax).
    model, x = ColumnRamp(), image(4, 6, b=1)
    probs = predict_slide(model, x, (4, 4), (4, 2))  # windows x in [0, 4) and [2, 6)
    with torch.no_grad():
        left, right = model(x[..., :4]), model(x[..., 2:])
    assert close(probs[..., :2], left[..., :2].softmax(1))
    assert close(probs[..., 2:4], ((left[..., 2:] + right[..., :2]) / 2).softmax(1))
    assert not close(probs[..., 2:4], (left[..., 2:].softmax(1) + right[..., :2].softmax(1)) / 2)
    assert close(probs[..., 4:], right[..., 2:].softmax(1))


def test_slide_pads_windows_smaller_than_the_crop():
    model = Recorder(per_pixel_model(), divisor=16)
    x = image(20, 40)  # smaller than the crop in height only
    probs = predict_slide(model, x, (32, 32), (16, 16))
    assert model.sizes == [(32, 32)] * 2 and probs.shape == (2, K, 20, 40)
    assert close(probs, predict_whole(per_pixel_model(), x))


def test_flip_tta_equals_whole_for_a_flip_invariant_model_and_not_otherwise():
    model, x = per_pixel_model(), image()
    assert close(predict_tta(model, x, scales=(1.0,), flip=True), predict_whole(model, x))
    ramp = ColumnRamp()
    flipped = predict_tta(ramp, x, scales=(1.0,), flip=True)
    assert not close(flipped, predict_whole(ramp, x))
    # the ramp and its mirror cancel: the first two classes' logits average out to equal probabilities
    expected = (predict_whole(ramp, x) + predict_whole(ramp, x.flip(-1)).flip(-1)) / 2
    assert close(flipped, expected)


def test_multiscale_on_constant_images_equals_whole():
    model = per_pixel_model()
    x = torch.randn(2, 3, 1, 1).expand(2, 3, 12, 18).contiguous()
    for mode, scales, kwargs in (
        ("whole", TTA_SCALES, {}),
        ("slide", (0.5, 1.5), {"crop_size": (8, 8), "stride": (6, 6)}),  # 1 and 3 x 4 windows
    ):
        probs = predict_tta(model, x, scales=scales, flip=True, mode=mode, **kwargs)
        assert close(probs, predict_whole(model, x))


def test_multiscale_sizes_follow_mmcv_rescale_and_probabilities_sum_to_one():
    model = Recorder(ColumnRamp())
    probs = predict_tta(model, image(10, 13), scales=(0.5, 1.0, 1.5), flip=True)
    # mmcv: box (int(13 s), int(10 s)), factor min(long / 13, short / 10), sides int(x * factor + 0.5).
    # s = 0.5: box (6, 5), factor 6/13 -> (int(5.12), int(6.5)) = (5, 6);
    # s = 1.5: box (19, 15), factor 19/13 -> (int(15.12), int(19.5)) = (15, 19), not round(19.5) = 20
    assert model.sizes == [(5, 6)] * 2 + [(10, 13)] * 2 + [(15, 19)] * 2
    assert probs.shape == (2, K, 10, 13)
    assert close(probs.sum(1), torch.ones(2, 10, 13)) and bool((probs >= 0).all())


def test_test_scale_resizes_the_input_and_returns_the_original_size():
    x = image(50, 100, b=1)
    for mode, kwargs in (("whole", {}), ("slide", {"crop_size": 32, "stride": 16}), ("cityscapes-halves", {})):
        model = Recorder(per_pixel_model())
        probs = predict(model, x, mode, test_scale=(64, 32), **kwargs)  # factor min(64/100, 32/50) = 0.64
        assert probs.shape == (1, K, 50, 100)
        assert {"whole": [(32, 64)], "slide": [(32, 32)] * 3, "cityscapes-halves": [(32, 32)] * 2}[mode] == model.sizes
    model = Recorder(per_pixel_model())
    predict_tta(model, x, scales=(0.5, 0.75, 1.0), flip=False, test_scale=[32, 64])  # either order, ratios of the box
    assert model.sizes == [(16, 32), (24, 48), (32, 64)]
    cityscapes = Recorder(per_pixel_model())
    predict(cityscapes, image(16, 32, b=1), test_scale=(32, 16))  # as Cityscapes' (2048, 1024) keeps 1024x2048
    assert cityscapes.sizes == [(16, 32)]


def test_test_scale_rounding_is_mmcvs():
    # 4x5 into (100, 2): factor min(100 / 5, 2 / 4) = 0.5 -> (int(2.0 + 0.5), int(2.5 + 0.5)) = (2, 3);
    # Python's round(2.5) would give 2
    model = Recorder(per_pixel_model())
    assert predict(model, image(4, 5), test_scale=(100, 2)).shape == (2, K, 4, 5)
    assert model.sizes == [(2, 3)]


class Checker(nn.Module):
    """Class 0's logit is 4 on a checkerboard's black squares and 0 elsewhere; class 1's is 0."""

    def forward(self, x):
        h, w = x.shape[-2:]
        board = ((torch.arange(h)[:, None] + torch.arange(w)) % 2 * 4.0).expand(x.shape[0], 1, h, w)
        return torch.cat([board, torch.zeros_like(board)], dim=1)


def test_logits_are_resized_to_the_original_size_before_the_softmax():
    # 2x2 into (4, 4): the model sees 4x4; halving bilinearly (align_corners=False) averages each
    # 2x2 block, so class 0's logit is 2 everywhere and its probability 1 / (1 + e^-2) = 0.881, not
    # the mean of the probabilities (1/2 + 1 / (1 + e^-4)) / 2 = 0.741
    probs = predict(Checker(), torch.zeros(1, 3, 2, 2), test_scale=(4, 4))
    assert probs.shape == (1, 2, 2, 2)
    assert torch.allclose(probs[:, 0], torch.full((1, 2, 2), 1 / (1 + math.exp(-2))))
    # passes are averaged as probabilities: the 4x4 pass (scale 1) with the 2x2 pass (scale 0.5)
    two = predict(Checker(), torch.zeros(1, 3, 2, 2), scales=(0.5, 1.0), test_scale=(4, 4))
    direct = torch.tensor([[0.0, 4.0], [4.0, 0.0]]).sigmoid()  # the 2x2 pass's own checkerboard
    assert torch.allclose(two[0, 0], (direct + 1 / (1 + math.exp(-2))) / 2)


def test_cityscapes_halves_of_an_odd_resized_width_overlap_by_a_column():
    model = Recorder(per_pixel_model())
    x = image(2, 10)
    probs = predict(model, x, "cityscapes-halves", scales=(0.7,))  # box (7, 1): factor 0.5 -> 1x5
    assert model.sizes == [(1, 3), (1, 3)] and probs.shape == (2, K, 2, 10)
    assert close(probs, predict_tta(per_pixel_model(), x, scales=(0.7,), flip=False))


def test_size_divisor_pads_for_models_that_need_multiples_of_16():
    model = Recorder(per_pixel_model(), divisor=16)
    x = image(40, 50)
    with pytest.raises(ValueError, match="multiples of 16"):
        predict_whole(model, x)
    probs = predict_tta(model, x, scales=(0.5, 1.0), flip=False, size_divisor=16)
    assert model.sizes == [(32, 32), (48, 64)]  # 20x25 and 40x50 padded up
    assert probs.shape == (2, K, 40, 50)
    assert close(predict_whole(model, x, size_divisor=16), predict_whole(per_pixel_model(), x))
    assert close(predict(model, x, size_divisor=16), predict_whole(per_pixel_model(), x))
    with pytest.raises(ValueError, match="divisible by size_divisor"):
        predict_tta(model, x, mode="slide", crop_size=(24, 24), stride=(8, 8), size_divisor=16)


def test_cityscapes_halves_equals_whole_for_a_per_pixel_model():
    model, x = Recorder(per_pixel_model()), image(8, 16)
    probs = predict_cityscapes_halves(model, x, flip=True)
    assert model.sizes == [(8, 8)] * 4  # two halves, each with its mirror
    assert close(probs, predict_whole(per_pixel_model(), x))
    assert close(predict(per_pixel_model(), x, mode="cityscapes-halves", flip=True), probs)
    # a position-dependent model shows the split: each half is predicted on its own
    ramp = ColumnRamp()
    ramp_probs = predict_cityscapes_halves(ramp, x, flip=False)
    assert close(ramp_probs, torch.cat([predict_whole(ramp, x[..., :8]), predict_whole(ramp, x[..., 8:])], -1))
    assert not close(ramp_probs, predict_whole(ramp, x))
    with pytest.raises(ValueError, match="even image width"):
        predict_cityscapes_halves(model, image(8, 15))


def test_predict_dispatches():
    model, x = ColumnRamp(), image()
    assert close(predict(model, x), predict_whole(model, x))
    assert close(predict(model, x, "slide", crop_size=(6, 6), stride=(4, 4)), predict_slide(model, x, 6, 4))
    assert close(
        predict(model, x, "slide", scales=(0.5, 1.0), flip=True, crop_size=6, stride=4),
        predict_tta(model, x, (0.5, 1.0), True, "slide", 6, 4),
    )
    assert close(predict(model, x, flip=True), predict_tta(model, x, (1.0,), True))


def test_errors():
    model, x = per_pixel_model(), image()
    known = r"\(known: whole, slide, cityscapes-halves\); did you mean 'slide'"
    with pytest.raises(ValueError, match=r"unknown inference mode 'slid' " + known):
        predict(model, x, mode="slid")
    with pytest.raises(ValueError, match="crop_size is required"):
        predict(model, x, mode="slide", stride=(4, 4))
    with pytest.raises(ValueError, match="stride is required"):
        predict(model, x, mode="slide", crop_size=(4, 4))
    with pytest.raises(ValueError, match="would leave gaps"):
        predict(model, x, mode="slide", crop_size=(4, 4), stride=(2, 5))
    with pytest.raises(ValueError, match="pair"):
        predict_slide(model, x, (4, 0), (2, 2))
    with pytest.raises(ValueError, match="scales"):
        predict(model, x, scales=())
    with pytest.raises(ValueError, match="B x C x H x W"):
        predict_whole(model, x[0])
    with pytest.raises(ValueError, match="logits B x K x H x W at its input's resolution"):
        predict_whole(nn.Conv2d(3, K, 3), x)  # no padding: output smaller than the input
    message = r"^test_scale must be None or a pair \(long, short\) of positive ints; got "
    for bad in ((0, 512), (512,), 512, "2048x512", (2048.0, 512), (True, 512), (2048, 512, 1)):
        with pytest.raises(ValueError, match=message) as err:
            predict(model, x, test_scale=bad)
        assert "\n" not in str(err.value)


def test_describe_mode_is_json_serialisable():
    desc = describe_mode("slide", scales=TTA_SCALES, flip=True, crop_size=512, stride=(341, 341))
    assert json.loads(json.dumps(desc)) == {
        "mode": "slide",
        "scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
        "flip": True,
        "crop_size": [512, 512],
        "stride": [341, 341],
        "size_divisor": None,
        "test_scale": None,
    }
    whole = describe_mode(crop_size=512, stride=341)
    assert whole["mode"] == "whole" and whole["crop_size"] is None and whole["stride"] is None
    assert describe_mode(test_scale=(2048, 512))["test_scale"] == [2048, 512]
    assert describe_mode(test_scale=[512, 2048])["test_scale"] == [2048, 512]  # (long, short) whichever order given
    with pytest.raises(ValueError, match="unknown inference mode"):
        describe_mode("tiles")
