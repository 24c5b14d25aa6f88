"""Segmentation models: one registry, one constructor (:func:`build_model`)."""
from . import transunet, unet  # noqa: F401  (register the architectures)
from .registry import arch_options, build_model, list_archs, register_arch
from .segmenter import SegmentationModel
from .weights import OFFLINE_WEIGHTS

__all__ = ["build_model", "list_archs", "arch_options", "register_arch", "SegmentationModel", "OFFLINE_WEIGHTS"]
