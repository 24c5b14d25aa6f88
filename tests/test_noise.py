import math

import pytest
import torch

from ddep.noise import corrupt, denoising_loss, sample_gamma, to_model_input


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_scaled_noise_matches_hand_formula():
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 4).view(2, 3, 4, 4)
    x_noisy, eps = corrupt(x, "scaled", 0.22, "noise", gen())
    # (x + sigma eps) / sqrt(1 + sigma^2) with sigma = 0.22: 1 + 0.0484 = 1.0484
    assert torch.allclose(x_noisy, (x + 0.22 * eps) / math.sqrt(1.0484), atol=1e-6)
    assert torch.equal(eps, torch.randn(x.shape, generator=gen()))  # eps is the generator's N(0, 1)


def test_scaled_noise_known_numbers():
    x = torch.full((1, 1, 1, 1), 0.5)
    x_noisy, eps = corrupt(x, noise_std=0.22, generator=gen(3))
    # sqrt(gamma) = 1 / sqrt(1.0484) = 0.9766445, sqrt(1 - gamma) = 0.22 / sqrt(1.0484) = 0.2148618
    assert x_noisy.item() == pytest.approx(0.5 * 0.9766445 + 0.2148618 * eps.item(), abs=1e-6)


def test_simple_noise_and_image_target():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    x_noisy, target = corrupt(x, "simple", 0.5, "image", gen())
    eps = torch.randn(x.shape, generator=gen())
    assert torch.allclose(x_noisy, x + 0.5 * eps, atol=1e-6)
    assert torch.equal(target, x)


def test_scaled_noise_preserves_unit_variance_and_simple_does_not():
    x = torch.randn(8, 3, 64, 64, generator=gen(1))
    for sigma in (0.22, 1.0, 3.0):
        scaled, _ = corrupt(x, "scaled", sigma, generator=gen(2))
        simple, _ = corrupt(x, "simple", sigma, generator=gen(2))
        assert scaled.var().item() == pytest.approx(1.0, abs=0.02)
        assert simple.var().item() == pytest.approx(1.0 + sigma**2, rel=0.02)


def test_uniform_sigma_is_per_example_and_in_range():
    x = torch.zeros(64, 1, 4, 4)
    x_noisy, eps = corrupt(x, "simple", generator=gen(), noise_level="uniform", noise_std_range=(0.2, 0.3))
    sigma = (x_noisy / eps).flatten(1)  # x = 0, so x_noisy = sigma * eps
    assert torch.allclose(sigma, sigma[:, :1].expand_as(sigma), atol=1e-5)  # one sigma per example
    per_example = sigma[:, 0]
    assert per_example.min() >= 0.2 - 1e-5 and per_example.max() <= 0.3 + 1e-5
    assert per_example.std() > 0.01


def test_ddpm_gamma_range_and_mean():
    gamma = sample_gamma(20000, "ddpm", gamma_min=0.5, generator=gen())
    assert gamma.shape == (20000,)
    assert gamma.min() >= 0.5 and gamma.max() <= 1.0
    assert gamma.mean().item() == pytest.approx(0.75, abs=0.01)


def test_ddpm_corruption_uses_per_example_gamma():
    x = torch.ones(16, 1, 2, 2)
    x_noisy, eps = corrupt(x, generator=gen(), noise_level="ddpm")
    gamma = sample_gamma(16, "ddpm", generator=gen()).view(-1, 1, 1, 1)
    assert torch.allclose(x_noisy, gamma.sqrt() * x + (1 - gamma).sqrt() * eps, atol=1e-6)


def test_fixed_gamma_value():
    assert sample_gamma(3, noise_std=0.22).tolist() == pytest.approx([1 / 1.0484] * 3)


def test_reproducible_from_generator():
    x = torch.rand(2, 3, 8, 8)
    a = corrupt(x, generator=gen(5), noise_level="uniform")
    b = corrupt(x, generator=gen(5), noise_level="uniform")
    c = corrupt(x, generator=gen(6), noise_level="uniform")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(noise_type="gaussian"), r"unknown noise_type 'gaussian' \(known: scaled, simple\)"),
        (dict(target="x0"), r"unknown target 'x0' \(known: noise, image\)"),
        (dict(noise_level="cosine"), "unknown noise_level 'cosine'"),
        (dict(noise_type="simple", noise_level="ddpm"), "use noise_type='scaled'"),
        (dict(noise_level="uniform", noise_std_range=(0.3, 0.2)), "noise_std_range"),
        (dict(noise_level="ddpm", gamma_min=1.5), "gamma_min"),
        (dict(noise_std=-0.1), "noise_std must be >= 0"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        corrupt(torch.zeros(1, 3, 4, 4), **kwargs)


def test_corrupt_needs_a_batch():
    with pytest.raises(ValueError, match="B x C x H x W"):
        corrupt(torch.zeros(3, 4, 4))


def test_losses_against_hand_computed_values():
    pred = torch.tensor([0.0, 2.0, -0.5, 0.0])
    target = torch.zeros(4)
    assert denoising_loss(pred, target).item() == pytest.approx((4 + 0.25) / 4)
    assert denoising_loss(pred, target, "l1").item() == pytest.approx((2 + 0.5) / 4)
    # Huber, delta 1: 0.5 d^2 where |d| <= 1, |d| - 0.5 beyond: (1.5 + 0.125) / 4
    assert denoising_loss(pred, target, "huber").item() == pytest.approx(1.625 / 4)
    with pytest.raises(ValueError, match=r"unknown loss 'l3' \(known: l2, l1, huber\)"):
        denoising_loss(pred, target, "l3")
    with pytest.raises(ValueError, match="differ in shape"):
        denoising_loss(pred, target[:3])


def test_to_model_input_maps_range_and_scales_sigma():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.tensor([-1.0, 1.0]).view(1, 1, 2, 1).expand(1, 3, 2, 1)
    out = to_model_input(x, mean, std)
    assert out[0, 0, 0, 0].item() == pytest.approx(-0.485 / 0.229)
    assert out[0, 2, 1, 0].item() == pytest.approx((1 - 0.406) / 0.225)
    # A step of 0.22 in [-1, 1] is 0.22 / (2 std) in normalised units: 0.480 for the red channel.
    step = to_model_input(x + 0.22, mean, std) - out
    assert step[0, 0, 0, 0].item() == pytest.approx(0.22 / (2 * 0.229))
    # With mean = std = 0.5 (the paper's ViT), [-1, 1] is already the model's space.
    assert torch.allclose(to_model_input(x, (0.5,) * 3, (0.5,) * 3), x)


@pytest.mark.parametrize("noise_type", ["scaled", "simple"])
def test_estimate_clean_inverts_the_corruption(noise_type):
    from ddep.noise import estimate_clean

    x = torch.rand(4, 3, 8, 8) * 2 - 1
    gamma = sample_gamma(4, "uniform", generator=gen(1))
    x_noisy, eps = corrupt(x, noise_type, generator=gen(2), gamma=gamma)
    assert torch.allclose(estimate_clean(x_noisy, eps, gamma, noise_type), x, atol=1e-5)  # a perfect noise prediction
    assert torch.equal(estimate_clean(x_noisy, x, gamma, noise_type, target="image"), x)
