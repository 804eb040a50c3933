"""Every kind of video model through BIVDiffPipeline: user frames, Mixed Inversion, temporal smoothing."""

import pytest
import torch
from pipeline_helpers import NUM_FRAMES, control_video, count_forward_calls
from video_model_helpers import VIDEO_MODELS, video_model_components

from bivdiff import BIVDiffPipeline

STEPS = 2


@pytest.mark.parametrize("video_model", VIDEO_MODELS)
def test_runs_with_every_video_model(video_model):
    pipe = BIVDiffPipeline(**video_model_components(video_model))
    pipe.set_progress_bar_config(disable=True)
    frames = control_video()
    args = dict(prompt="a dog", num_inference_steps=STEPS, output_type="latent")
    with count_forward_calls(video_unet=pipe.video_unet) as calls:
        out = pipe(video=frames, mixing_ratio=0.5, **args).frames
    assert out.shape == (1, 4, NUM_FRAMES, 16, 16) and torch.isfinite(out).all()
    # One video-UNet call per inversion step and one per smoothing step (CFG batched into the same call).
    assert calls["video_unet"] == 2 * STEPS

    # The video model smooths across frames: changing the first input frame changes the later output frames.
    changed = frames.copy()
    changed[0] = 1 - changed[0]
    other = pipe(video=changed, mixing_ratio=0.0, **args).frames
    base = pipe(video=frames, mixing_ratio=0.0, **args).frames
    assert (other - base)[:, :, 1:].abs().amax() > 1e-4
