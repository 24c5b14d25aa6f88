"""ddep: Decoder Denoising Pretraining for label-efficient semantic segmentation."""
from . import noise
from .models import SegmentationModel, build_model, list_archs

__version__ = "0.1.0"
__all__ = ["build_model", "list_archs", "SegmentationModel", "noise", "__version__"]
