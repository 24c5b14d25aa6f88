"""ddep: Decoder Denoising Pretraining for label-efficient semantic segmentation."""
from . import noise
from .models import SegmentationModel, build_model, from_smp, list_archs, to_smp

__version__ = "0.1.0"
__all__ = ["build_model", "list_archs", "SegmentationModel", "from_smp", "to_smp", "noise", "__version__"]
