"""How far the frozen encoder's features move when noise is added to its input.

DDeP trains the decoder on the features of *noisy* images and fine-tunes it on those of clean
ones. For each sigma (scaled noise, in [-1, 1] units) this prints, per encoder stage, the cosine
similarity between the features of a clean and a noisy demo scene (per pixel, averaged) and the
relative change ||f(noisy) - f(clean)|| / ||f(clean)||. Usage:

    python benchmarks/encoder_noise_shift.py [--size 64] [--images 64] [--sigmas 0.1 0.22 0.5 0.8]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ddep.data import build_dataset
from ddep.models import build_model
from ddep.noise import corrupt, to_model_input


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.22, 0.35, 0.5, 0.8])
    args = parser.parse_args()
    model = build_model("unet", "tf_efficientnet_lite0", "efficientnet-lite0").eval()
    mean, std = model.config["mean"], model.config["std"]
    data = build_dataset("demo", split="val", size=args.size, num_images=args.images)
    x = torch.stack([data[i]["image"] for i in range(args.images)]) * 2 - 1
    clean = model.encoder(to_model_input(x, mean, std))
    generator = torch.Generator().manual_seed(0)
    stages = [f"1/{args.size // f.shape[-1]}" for f in clean]
    print("sigma  " + "  ".join(f"{s:>14s}" for s in stages) + "   (cosine, relative change)")
    for sigma in args.sigmas:
        noisy_x, _ = corrupt(x, "scaled", noise_std=sigma, generator=generator)
        noisy = model.encoder(to_model_input(noisy_x, mean, std))
        cells = []
        for a, b in zip(clean, noisy):
            cosine = F.cosine_similarity(a, b, dim=1).mean().item()
            change = ((b - a).norm() / a.norm()).item()
            cells.append(f"{cosine:6.3f} {change:7.3f}")
        print(f"{sigma:5.2f}  " + "  ".join(f"{c:>14s}" for c in cells))


if __name__ == "__main__":
    main()
