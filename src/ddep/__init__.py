"""ddep: Decoder Denoising Pretraining for label-efficient semantic segmentation.

The names below are imported on first use (PEP 562), so that ``ddep --help`` and ``--version``
do not wait for torch, timm and smp to load.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Each public name and the submodule that defines it.
_LAZY = {
    "build_model": "models", "list_archs": "models", "SegmentationModel": "models", "from_smp": "models", "to_smp": "models",
    "load_model": "models.saving", "save_model": "models.saving",
}
#: The subpackages and modules that ``ddep.<name>`` reaches without an import of its own.
_SUBMODULES = ("noise", "models", "data", "engine", "inference", "metrics", "config", "experiments")
__all__ = [*_LAZY, "noise", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ddep' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
