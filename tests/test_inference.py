import json

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


def test_multiscale_resizes_to_rounded_sizes_and_probabilities_sum_to_one():
    model = Recorder(ColumnRamp())
    probs = predict_tta(model, image(10, 13), scales=(0.5, 1.0, 1.5), flip=True)
    assert model.sizes == [(5, 6)] * 2 + [(10, 13)] * 2 + [(15, 20)] * 2  # round(6.5) = 6, round(19.5) = 20
    assert probs.shape == (2, K, 10, 13)
    assert close(probs.sum(1), torch.ones(2, 10, 13)) and bool((probs >= 0).all())


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


def test_describe_mode_is_json_serialisable():
    desc = describe_mode("slide", scales=TTA_SCALES, flip=True, crop_size=512, stride=(341, 341))
    assert json.loads(json.dumps(desc)) == {
        "mode": "slide",
        "scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
        "flip": True,
        "crop_size": [512, 512],
        "stride": [341, 341],
        "size_divisor": None,
    }
    whole = describe_mode(crop_size=512, stride=341)
    assert whole["mode"] == "whole" and whole["crop_size"] is None and whole["stride"] is None
    with pytest.raises(ValueError, match="unknown inference mode"):
        describe_mode("tiles")
