"""BIVDiff: training-free video synthesis by bridging image and video diffusion models.

The pipelines, scheduler and models are imported on first use, so `import bivdiff` (and the command line's
`list`, `--help` and config checks) does not pay for importing diffusers and transformers.
"""

import importlib

__version__ = "0.1.0"

_PIPELINES = ("BIVDiffControllablePipeline", "BIVDiffInpaintPipeline", "BIVDiffInstructPix2PixPipeline",
              "BIVDiffPipeline", "BIVDiffPipelineOutput", "BIVDiffPrompt2PromptPipeline",
              "BIVDiffPrompt2PromptPipelineOutput", "MixedInversionMixin", "load_video_model")
_EXPORTS = {**dict.fromkeys(_PIPELINES, "bivdiff.pipelines"), "BIVDiffDDIMInverseScheduler": "bivdiff.schedulers",
            "VidRDUNet3DConditionModel": "bivdiff.models",
            "motion_unet_sharing_weights": "bivdiff.models"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bivdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
