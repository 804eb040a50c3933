"""Models that diffusers does not ship (the VidRD UNet port), and the AnimateDiff UNet built on shared weights."""

from .motion_unet import motion_unet_sharing_weights
from .unet_vidrd import VidRDUNet3DConditionModel

__all__ = ["VidRDUNet3DConditionModel", "motion_unet_sharing_weights"]
