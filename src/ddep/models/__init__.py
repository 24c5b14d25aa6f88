"""Segmentation models: one registry, one constructor (:func:`build_model`)."""
from . import smp_models, transunet, unet  # noqa: F401  (register the architectures)
from .registry import arch_options, build_model, list_archs, register_arch
from .segmenter import SegmentationModel
from .smp_models import SmpModel, from_smp, save_smp, to_smp
from .weights import OFFLINE_WEIGHTS

__all__ = ["build_model", "list_archs", "arch_options", "register_arch", "SegmentationModel", "SmpModel", "from_smp",
           "to_smp", "save_smp", "OFFLINE_WEIGHTS"]
