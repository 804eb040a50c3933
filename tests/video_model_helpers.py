"""Pipeline components with each kind of video model: ZeroScope/ModelScope, AnimateDiff and VidRD, all tiny."""

from __future__ import annotations

from pipeline_helpers import bivdiff_components

from bivdiff.models import motion_unet_sharing_weights
from bivdiff.tiny_models import (
    VIDEO_TEXT_DIM,
    tiny_modelscope_unet,
    tiny_motion_adapter,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_vidrd_unet,
)

VIDEO_MODELS = ("zeroscope", "modelscope", "animatediff", "vidrd")


def video_model_components(video_model: str, **overrides) -> dict:
    """Every component of a BIVDiff pipeline (`overrides` laid over the tiny defaults), the video side being
    `video_model`'s. AnimateDiff is built on the SD-1.5 UNet of the image side: `inversion_unet` when the image
    model has its own (InstructPix2Pix, inpainting), else `unet`."""
    components = bivdiff_components(**overrides)
    if video_model == "animatediff":
        base = components.get("inversion_unet") or components["unet"]
        # AnimateDiff reads SD-1.5's CLIP embeddings: the image text encoder is the video one.
        video_unet = motion_unet_sharing_weights(base, tiny_motion_adapter())
        return dict(components, video_unet=video_unet, video_text_encoder=components["text_encoder"],
                    video_tokenizer=components["tokenizer"])
    video_unets = {"modelscope": tiny_modelscope_unet, "vidrd": tiny_vidrd_unet}
    if video_model in video_unets:
        video = dict(
            video_unet=video_unets[video_model](),
            video_text_encoder=tiny_text_encoder(VIDEO_TEXT_DIM, seed=1),
            video_tokenizer=tiny_tokenizer(),
        )
        return {**components, **video}
    if video_model == "zeroscope":
        return components
    raise ValueError(f"unknown video model {video_model!r}")
