"""BIVDiff: training-free video synthesis by bridging image and video diffusion models."""

from bivdiff.pipelines import (
    BIVDiffControllablePipeline,
    BIVDiffInpaintPipeline,
    BIVDiffInstructPix2PixPipeline,
    BIVDiffPipeline,
    BIVDiffPipelineOutput,
    BIVDiffPrompt2PromptPipeline,
    BIVDiffPrompt2PromptPipelineOutput,
    MixedInversionMixin,
)
from bivdiff.models import VidRDUNet3DConditionModel
from bivdiff.schedulers import BIVDiffDDIMInverseScheduler

__version__ = "0.1.0"

__all__ = [
    "BIVDiffControllablePipeline",
    "BIVDiffDDIMInverseScheduler",
    "BIVDiffInpaintPipeline",
    "BIVDiffInstructPix2PixPipeline",
    "BIVDiffPipeline",
    "BIVDiffPipelineOutput",
    "BIVDiffPrompt2PromptPipeline",
    "BIVDiffPrompt2PromptPipelineOutput",
    "MixedInversionMixin",
    "VidRDUNet3DConditionModel",
]
