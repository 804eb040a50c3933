from .mixed_inversion import BIVDiffPipelineOutput, MixedInversionMixin, load_video_model
from .pipeline_bivdiff import BIVDiffPipeline
from .pipeline_bivdiff_controllable import BIVDiffControllablePipeline
from .pipeline_bivdiff_inpaint import BIVDiffInpaintPipeline
from .pipeline_bivdiff_instruct_pix2pix import BIVDiffInstructPix2PixPipeline
from .pipeline_bivdiff_prompt2prompt import BIVDiffPrompt2PromptPipeline, BIVDiffPrompt2PromptPipelineOutput

__all__ = [
    "BIVDiffPipelineOutput",
    "MixedInversionMixin",
    "BIVDiffPipeline",
    "BIVDiffControllablePipeline",
    "BIVDiffInpaintPipeline",
    "BIVDiffInstructPix2PixPipeline",
    "BIVDiffPrompt2PromptPipeline",
    "BIVDiffPrompt2PromptPipelineOutput",
    "load_video_model",
]
