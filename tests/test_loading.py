"""Loading a BIVDiff pipeline the way the README shows: an SD-1.5 folder plus the video model's components."""

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from pipeline_helpers import control_video, generators

from bivdiff import BIVDiffControllablePipeline, BIVDiffDDIMInverseScheduler
from bivdiff.tiny_models import tiny_controlnet, tiny_image_components, tiny_video_components


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15")
    image = tiny_image_components()
    image.pop("inverse_scheduler")
    StableDiffusionPipeline(
        **image, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(folder)
    return folder


def test_from_an_sd15_folder_with_video_components(sd_folder):
    pipe = BIVDiffControllablePipeline.from_pretrained(
        sd_folder,
        controlnet=tiny_controlnet(),
        inverse_scheduler=BIVDiffDDIMInverseScheduler.from_pretrained(sd_folder, subfolder="scheduler"),
        **tiny_video_components(),
    )
    pipe.set_progress_bar_config(disable=True)
    inv = pipe.inverse_scheduler
    inv.set_timesteps(50)
    assert isinstance(inv, BIVDiffDDIMInverseScheduler) and inv.timesteps[0].item() == 1
    out = pipe(prompt="a cat", conditioning_frames=control_video(), num_inference_steps=2, generator=generators())
    assert out.frames.shape == (1, 3, 32, 32, 3) and np.isfinite(out.frames).all()


def test_inverse_scheduler_added_after_loading_is_saved(sd_folder, tmp_path):
    """`pipe.inverse_scheduler = ...` on a pipeline loaded without one would leave `model_index.json` empty
    (diffusers keeps a None entry), so `register_modules` is the way; saving then reloads it."""
    pipe = BIVDiffControllablePipeline.from_pretrained(
        sd_folder, controlnet=tiny_controlnet(), inverse_scheduler=None, **tiny_video_components()
    )
    pipe.register_modules(inverse_scheduler=BIVDiffDDIMInverseScheduler.from_config(pipe.scheduler.config))
    pipe.save_pretrained(tmp_path)
    assert isinstance(
        BIVDiffControllablePipeline.from_pretrained(tmp_path).inverse_scheduler, BIVDiffDDIMInverseScheduler
    )
