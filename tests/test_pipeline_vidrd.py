"""Every pipeline takes a VidRD UNet as its video model: end to end, and saved/reloaded by class name."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from pipeline_helpers import bivdiff_components, control_video, generators, pipeline_file

from bivdiff import BIVDiffControllablePipeline, VidRDUNet3DConditionModel
from bivdiff.tiny_models import tiny_controlnet, tiny_vidrd_unet


@pytest.fixture(scope="module")
def pipe():
    pipe = BIVDiffControllablePipeline(
        **bivdiff_components(video_unet=tiny_vidrd_unet(), controlnet=tiny_controlnet())
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs():
    return dict(
        prompt="a red car",
        conditioning_frames=control_video(),
        num_inference_steps=2,
        mixing_ratio=0.5,
        generator=generators(),
    )


def test_controlnet_with_vidrd_end_to_end(pipe):
    out = pipe(**inputs())
    assert out.frames.shape == (1, 3, 32, 32, 3) and np.isfinite(out.frames).all()
    # The video model is in eval mode, so the same input gives the same video (the original's dropout did not).
    np.testing.assert_array_equal(out.frames, pipe(**inputs()).frames)


def test_saved_pipeline_names_the_vidrd_class_and_reloads_it(pipe, tmp_path, modules_cache):
    expected = pipe(**inputs()).frames
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["video_unet"] == ["bivdiff.models.unet_vidrd", "VidRDUNet3DConditionModel"]
    for loaded in (
        BIVDiffControllablePipeline.from_pretrained(tmp_path),
        DiffusionPipeline.from_pretrained(
            tmp_path, custom_pipeline=pipeline_file("pipeline_bivdiff_controllable.py"), trust_remote_code=True
        ),
    ):
        assert isinstance(loaded.video_unet, VidRDUNet3DConditionModel) and not loaded.video_unet.training
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(loaded(**inputs()).frames, expected, atol=1e-5)


@torch.no_grad()
def test_vidrd_inversion_uses_the_whole_clip(pipe):
    latents = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = pipe.encode_video_prompt("", "cpu")[0]
    whole = pipe.invert_video_branch(latents, cond, 2)
    # Temporal layers couple the frames: inverting frame 0 alone gives something else.
    alone = pipe.invert_video_branch(latents[:, :, :1], cond, 2)
    assert not torch.allclose(whole[:, :, :1], alone, atol=1e-4)
