from .mixed_inversion import BIVDiffPipelineOutput, MixedInversionMixin
from .pipeline_bivdiff import BIVDiffPipeline
from .pipeline_bivdiff_controllable import BIVDiffControllablePipeline
from .pipeline_bivdiff_inpaint import BIVDiffInpaintPipeline
from .pipeline_bivdiff_instruct_pix2pix import BIVDiffInstructPix2PixPipeline

__all__ = ["BIVDiffPipelineOutput", "MixedInversionMixin", "BIVDiffPipeline", "BIVDiffControllablePipeline"]
__all__ += ["BIVDiffInpaintPipeline", "BIVDiffInstructPix2PixPipeline"]
