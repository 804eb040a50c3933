from .mixed_inversion import BIVDiffPipelineOutput, MixedInversionMixin
from .pipeline_bivdiff import BIVDiffPipeline
from .pipeline_bivdiff_controllable import BIVDiffControllablePipeline
from .pipeline_bivdiff_prompt2prompt import BIVDiffPrompt2PromptPipeline, BIVDiffPrompt2PromptPipelineOutput

__all__ = [
    "BIVDiffPipelineOutput",
    "MixedInversionMixin",
    "BIVDiffPipeline",
    "BIVDiffControllablePipeline",
    "BIVDiffPrompt2PromptPipeline",
    "BIVDiffPrompt2PromptPipelineOutput",
]
