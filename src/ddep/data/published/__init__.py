"""The semi-supervised literature's labeled splits, shipped so that numbers compare with it.

The files are UniMatch's (github.com/LiheYoung/UniMatch, ``splits/``, commit 0324f3dd, MIT
licence: ``LICENSE-UniMatch``), as its tables and those it compares with use them: Pascal VOC
2012 with the SBD augmented masks (10,582 training images, ``pascal/train_aug.txt``; 1,449
validation images, ``pascal/val.txt``), labeled subsets of 92 to 1464 images drawn from VOC's
1,464 finely annotated ones, and 1/16 to 1/4 of all 10,582 (``1_16``...); Cityscapes' 1/30 to 1/2
of its 2,975 training images. Each file lists ``image mask`` pairs relative to the dataset root;
the images are what a split names (ddep finds each dataset's own masks). The unlabeled images of
a split are the training images outside it (UniMatch's ``unlabeled.txt``, not shipped).
"""
from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent
#: Labeled splits by name (``data.labeled: pascal/92``), and the dataset each one belongs to.
SPLITS = {f"{dataset}/{amount}": dataset
          for dataset, amounts in (("pascal", ("92", "183", "366", "732", "1464", "1_16", "1_8", "1_4")),
                                   ("cityscapes", ("1_30", "1_16", "1_8", "1_4", "1_2")))
          for amount in amounts}
#: The ddep dataset of each: Pascal's lists are VOC 2012 + SBD (``pascal_voc``).
DATASETS = {"pascal": "pascal_voc", "cityscapes": "cityscapes"}


def published_images(name: str) -> list[str]:
    """The images (paths relative to the dataset root) of the labeled split ``name``."""
    return _images(FOLDER / name / "labeled.txt")


def pascal_list(split: str) -> list[str]:
    """Pascal VOC 2012's ``train`` (with SBD: ``train_aug``) or ``val`` images, as UniMatch lists them."""
    return _images(FOLDER / "pascal" / ("train_aug.txt" if split == "train" else "val.txt"))


def _images(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
