"""The denoising objective: how DDeP corrupts images and what the decoder learns to predict.

Everything here works on images scaled to [-1, 1], the paper's input space, so that one noise
level means the same corruption whatever normalisation the encoder expects. Corrupt first, then
call :func:`to_model_input` to move the noisy image into the encoder's normalised space.

With ``gamma = 1 / (1 + sigma^2)``:

- ``scaled``:  x_noisy = sqrt(gamma) * x + sqrt(1 - gamma) * eps   (= (x + sigma eps) / sqrt(1 + sigma^2))
- ``simple``:  x_noisy = x + sigma * eps

The noise level is one fixed sigma (default 0.22), sigma ~ U[a, b] per example, or, as in DDPM,
gamma ~ U[gamma_min, 1] per example. The target is eps (``noise``) or x (``image``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .choices import check_choice

NOISE_TYPES = ("scaled", "simple")
TARGETS = ("noise", "image")
NOISE_LEVELS = ("fixed", "uniform", "ddpm")
LOSSES = ("l2", "l1", "huber")


def sample_gamma(
    batch_size: int,
    noise_level: str = "fixed",
    noise_std: float = 0.22,
    noise_std_range: tuple[float, float] = (0.2, 0.3),
    gamma_min: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Signal fraction gamma = 1 / (1 + sigma^2) per example, shape (batch_size,), float32.

    ``fixed`` uses ``noise_std``; ``uniform`` draws sigma ~ U[noise_std_range]; ``ddpm`` draws
    gamma ~ U[gamma_min, 1] directly.
    """
    check_choice("noise_level", noise_level, NOISE_LEVELS)
    if noise_level == "fixed":
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0; got {noise_std}")
        sigma = torch.full((batch_size,), float(noise_std), device=device)
        return 1.0 / (1.0 + sigma**2)
    u = torch.rand(batch_size, generator=generator, device=device)
    if noise_level == "uniform":
        low, high = noise_std_range
        if not 0 <= low <= high:
            raise ValueError(f"noise_std_range must satisfy 0 <= low <= high; got {noise_std_range}")
        sigma = low + (high - low) * u
        return 1.0 / (1.0 + sigma**2)
    if not 0 <= gamma_min <= 1:
        raise ValueError(f"gamma_min must be in [0, 1]; got {gamma_min}")
    return gamma_min + (1.0 - gamma_min) * u


def corrupt(
    x: torch.Tensor,
    noise_type: str = "scaled",
    noise_std: float = 0.22,
    target: str = "noise",
    generator: torch.Generator | None = None,
    *,
    noise_level: str = "fixed",
    noise_std_range: tuple[float, float] = (0.2, 0.3),
    gamma_min: float = 0.0,
    gamma: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add Gaussian noise to a batch ``x`` (B x C x H x W, values in [-1, 1]).

    Returns ``(x_noisy, target)``: the target is the noise eps for ``target="noise"`` and the clean
    ``x`` for ``target="image"``. Pass a ``generator`` (on ``x``'s device) for reproducible noise,
    and ``gamma`` (B,) to use levels drawn beforehand with :func:`sample_gamma`.
    """
    check_choice("noise_type", noise_type, NOISE_TYPES)
    check_choice("target", target, TARGETS)
    if x.dim() != 4:
        raise ValueError(f"corrupt expects a batch B x C x H x W; got shape {tuple(x.shape)}")
    if noise_type == "simple" and noise_level == "ddpm":
        raise ValueError("noise_level='ddpm' reaches gamma = 0 (infinite sigma): use noise_type='scaled'")
    if gamma is None:
        gamma = sample_gamma(x.shape[0], noise_level, noise_std, noise_std_range, gamma_min, generator, x.device)
    gamma = _per_example(gamma, x)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if noise_type == "scaled":
        x_noisy = gamma.sqrt() * x + (1 - gamma).sqrt() * eps
    else:
        x_noisy = x + ((1 - gamma) / gamma).sqrt() * eps
    return x_noisy, (eps if target == "noise" else x)


def _per_example(gamma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``gamma`` (B,) shaped to broadcast over ``x`` (B x C x H x W)."""
    return gamma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def estimate_clean(
    x_noisy: torch.Tensor, prediction: torch.Tensor, gamma: torch.Tensor, noise_type: str = "scaled", target: str = "noise"
) -> torch.Tensor:
    """The clean image implied by the decoder's prediction: the corruption solved for x."""
    if target == "image":
        return prediction
    g = _per_example(gamma, x_noisy)
    if noise_type == "scaled":
        return (x_noisy - (1 - g).sqrt() * prediction) / g.sqrt()
    return x_noisy - ((1 - g) / g).sqrt() * prediction


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor, loss: str = "l2", huber_delta: float = 1.0) -> torch.Tensor:
    """Mean per-pixel regression loss between the decoder's output and the target."""
    check_choice("loss", loss, LOSSES)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    if loss == "l2":
        return F.mse_loss(prediction, target)
    if loss == "l1":
        return F.l1_loss(prediction, target)
    return F.huber_loss(prediction, target, delta=huber_delta)


def zero_prediction_loss(loss: str = "l2", huber_delta: float = 1.0) -> float:
    """The loss of predicting zero for a standard normal target (the noise): the score a denoising
    loss is read against (l2: 1, l1: sqrt(2 / pi), Huber: its expectation under N(0, 1))."""
    check_choice("loss", loss, LOSSES)
    if loss == "l2":
        return 1.0
    if loss == "l1":
        return math.sqrt(2 / math.pi)
    density = math.exp(-huber_delta**2 / 2) / math.sqrt(2 * math.pi)  # phi(delta)
    inside = math.erf(huber_delta / math.sqrt(2))  # P(|x| < delta)
    return 0.5 * (inside - 2 * huber_delta * density) + huber_delta * (2 * density - 0.5 * huber_delta * (1 - inside))


def to_model_input(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Map images from [-1, 1] to the encoder's normalised space: ((x + 1) / 2 - mean) / std."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return ((x + 1) / 2 - mean_t) / std_t
