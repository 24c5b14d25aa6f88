"""The supervised loss: cross-entropy averaged over the pixels not ignored."""
import math

import pytest
import torch
import torch.nn.functional as F

from ddep.engine.losses import supervised_loss


def test_the_mean_over_the_pixels_not_ignored_by_hand_and_as_torch_computes_it():
    logits = torch.tensor([[0.0, 0.0, 5.0], [0.0, math.log(3), -5.0]]).view(1, 2, 1, 3)  # 2 classes, 3 pixels
    mask = torch.tensor([[[0, 1, 255]]])
    # pixel 1: softmax (1/2, 1/2), class 0: ln 2; pixel 2: (1/4, 3/4), class 1: ln 4/3; pixel 3 ignored
    assert supervised_loss(logits, mask).item() == pytest.approx(math.log(8 / 3) / 2, rel=1e-6)
    logits, mask = torch.randn(2, 5, 7, 9), torch.randint(0, 5, (2, 7, 9))
    mask[0, :3] = 255
    torch.testing.assert_close(supervised_loss(logits, mask), F.cross_entropy(logits, mask, ignore_index=255))


def test_a_crop_whose_every_pixel_is_ignored_gives_zero_and_a_zero_gradient_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = supervised_loss(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_low_precision_logits_are_scored_in_float32():
    logits = torch.randn(1, 3, 4, 4).bfloat16()
    mask = torch.randint(0, 3, (1, 4, 4))
    loss = supervised_loss(logits, mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), mask))
