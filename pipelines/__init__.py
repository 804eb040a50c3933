from .mixed_inversion import BIVDiffPipelineOutput, MixedInversionMixin
from .pipeline_bivdiff import BIVDiffPipeline
from .pipeline_bivdiff_controllable import BIVDiffControllablePipeline

__all__ = ["BIVDiffPipelineOutput", "MixedInversionMixin", "BIVDiffPipeline", "BIVDiffControllablePipeline"]
