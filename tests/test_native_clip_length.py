"""Each video model's training clip length, and the windows a clip gets by default."""

import pytest
import torch
from diffusers import UNet3DConditionModel
from video_model_helpers import video_model_components

from bivdiff.pipelines.mixed_inversion import native_num_frames, video_model_family
from bivdiff.tiny_models import tiny_video_unet


@pytest.mark.parametrize(
    "video_model, family, frames",
    [("animatediff", "animatediff", 16), ("vidrd", "vidrd", 8), ("modelscope", "modelscope", 16)],
)
def test_family_and_length_from_the_class(video_model, family, frames):
    unet = video_model_components(video_model)["video_unet"]
    assert video_model_family(unet) == family
    assert native_num_frames(unet) == frames
    # `torch.compile` wraps the model (lazily: nothing is compiled here); the wrapped model is what counts.
    compiled = torch.compile(unet)
    assert (video_model_family(compiled), native_num_frames(compiled)) == (family, frames)


@pytest.mark.parametrize(
    "folder, family, frames",
    [
        ("zeroscope_v2_576w", "zeroscope", 24),
        ("ZeroScope/zeroscope_v2_576w", "zeroscope", 24),
        ("text-to-video-ms-1.7b", "modelscope", 16),
    ],
)
def test_unet3d_named_by_the_folder_it_was_loaded_from(tmp_path, folder, family, frames):
    # ModelScope and ZeroScope share class and config: the path from_pretrained records is what tells them apart.
    tiny_video_unet().save_pretrained(tmp_path / folder)
    unet = UNet3DConditionModel.from_pretrained(tmp_path / folder)
    assert video_model_family(unet) == family
    assert native_num_frames(unet) == frames


def test_name_hint_and_config_entry_decide_over_the_class():
    unet = tiny_video_unet()
    assert native_num_frames(unet) == 16
    assert native_num_frames(unet, name_hint="cerspense/zeroscope_v2_576w") == 24
    unet.register_to_config(native_num_frames=12)
    assert native_num_frames(unet, name_hint="cerspense/zeroscope_v2_576w") == 12


def test_config_entry_survives_save_and_load(tmp_path):
    unet = tiny_video_unet()
    unet.register_to_config(native_num_frames=24)
    unet.save_pretrained(tmp_path)
    assert native_num_frames(UNet3DConditionModel.from_pretrained(tmp_path)) == 24


def test_unknown_model_has_no_native_length():
    assert video_model_family(object()) is None
    assert native_num_frames(object()) is None
