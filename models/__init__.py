"""Models that diffusers does not ship (the VidRD UNet port)."""

from .unet_vidrd import VidRDUNet3DConditionModel

__all__ = ["VidRDUNet3DConditionModel"]
