"""BIVDiffPipeline: frames from any image model through stages 2 and 3."""

import numpy as np
import PIL.Image
import pytest
import torch
from pipeline_helpers import (
    NUM_FRAMES,
    all_models,
    bivdiff_components,
    control_video,
    count_forward_calls,
)

from bivdiff import BIVDiffPipeline
from bivdiff.tiny_models import tiny_unet


def make_pipe(**overrides):
    pipe = BIVDiffPipeline(**bivdiff_components(**overrides))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def test_frames_as_pil_numpy_or_tensor_give_the_same_video(pipe):
    frames = control_video()
    as_pil = [PIL.Image.fromarray((f * 255).round().astype(np.uint8)) for f in frames]
    quantised = np.stack([np.asarray(im) / 255.0 for im in as_pil]).astype(np.float32)
    args = dict(prompt="a dog", num_inference_steps=2, mixing_ratio=0.5, output_type="latent")
    a = pipe(video=as_pil, **args).frames
    b = pipe(video=quantised, **args).frames
    c = pipe(video=torch.from_numpy(quantised).permute(0, 3, 1, 2), **args).frames
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    assert a.shape == (1, 4, NUM_FRAMES, 16, 16)


def test_latents_in_equal_frames_in(pipe):
    """Given latents are inverted as given with `reencode_frames=False`; frames are encoded once either way."""
    frames = control_video()
    args = dict(prompt="a dog", num_inference_steps=2, mixing_ratio=0.5, output_type="latent")
    latents = pipe.encode_frames(pipe.source_pixels(frames, 32, 32), chunk_size=8)
    from_frames = pipe(video=frames, **args).frames
    torch.testing.assert_close(from_frames, pipe(video_latents=latents, reencode_frames=False, **args).frames)
    torch.testing.assert_close(from_frames, pipe(video=frames, reencode_frames=False, **args).frames)
    assert not torch.allclose(from_frames, pipe(video_latents=latents, **args).frames, atol=1e-3)


def test_mixing_ratio_zero_needs_no_image_model():
    pipe = make_pipe(unet=None, text_encoder=None, tokenizer=None)
    out = pipe(video=control_video(), prompt="a dog", num_inference_steps=2, mixing_ratio=0.0)
    assert out.frames.shape == (1, NUM_FRAMES, 32, 32, 3) and out.idm_frames is None
    with pytest.raises(ValueError, match="needs an image UNet"):
        pipe(video=control_video(), prompt="a dog", num_inference_steps=2, mixing_ratio=0.5)


def test_inversion_prompt_changes_the_conditioning(pipe):
    args = dict(video=control_video(), prompt="a dog", num_inference_steps=2, mixing_ratio=0.5, output_type="latent")
    assert not torch.allclose(pipe(**args).frames, pipe(inversion_prompt="a cat", **args).frames)


def test_nine_channel_unet_in_image_branch_is_refused_before_running():
    pipe = make_pipe(unet=tiny_unet(in_channels=9))
    with count_forward_calls(**all_models(pipe)) as calls:
        with pytest.raises(ValueError, match="inversion_unet"):
            pipe(video=control_video(), prompt="a dog", num_inference_steps=2, mixing_ratio=1.0)
    assert sum(calls.values()) == 0


def test_exactly_one_of_video_and_video_latents(pipe):
    with pytest.raises(ValueError, match="exactly one of `video`"):
        pipe(prompt="a dog")


@torch.no_grad()
def test_vae_encoding_is_chunked_by_decode_chunk_size_not_frame_batch_size(pipe):
    with count_forward_calls(encoder=pipe.vae.encoder) as calls:
        pipe(video=control_video(), prompt="a dog", num_inference_steps=1, frame_batch_size=1, decode_chunk_size=3,
             output_type="latent")  # fmt: skip
    assert calls["encoder"] == 1


@torch.no_grad()
def test_resize_mode_crop_keeps_the_aspect_ratio(pipe):
    wide = np.random.default_rng(0).random((3, 32, 48, 3)).astype(np.float32)
    args = dict(prompt="a dog", num_inference_steps=1, output_type="latent", height=32, width=32)
    cropped = pipe(video=wide, resize_mode="crop", **args).frames
    centre = pipe(video=wide[:, :, 8:40], **args).frames
    stretched = pipe(video=wide, **args).frames
    torch.testing.assert_close(cropped, centre, atol=1e-2, rtol=0)
    assert not torch.allclose(cropped, stretched, atol=1e-2)


@torch.no_grad()
def test_an_animatediff_motion_unet_gets_its_text_embeddings_per_frame():
    from diffusers import MotionAdapter, UNetMotionModel

    from bivdiff.tiny_models import VIDEO_TEXT_DIM, tiny_unet

    torch.manual_seed(0)
    image_unet = tiny_unet()
    image_unet.register_to_config(cross_attention_dim=VIDEO_TEXT_DIM)
    base = type(image_unet).from_config(image_unet.config)
    adapter = MotionAdapter(
        block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=2,
        motion_num_attention_heads=2, motion_max_seq_length=8,
    )  # fmt: skip
    motion = UNetMotionModel.from_unet2d(base, adapter).eval()
    pipe = BIVDiffPipeline(**bivdiff_components(video_unet=motion))
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(2, 77, VIDEO_TEXT_DIM, generator=torch.Generator().manual_seed(1))
    expected = motion(latents, 10, encoder_hidden_states=embeds.repeat_interleave(3, dim=0)).sample
    torch.testing.assert_close(pipe.video_unet_noise(latents, 10, embeds), expected, atol=0, rtol=0)
    out = pipe(video=control_video(), prompt="a dog", num_inference_steps=2, mixing_ratio=0.0, output_type="latent")
    assert out.frames.shape == (1, 4, 3, 16, 16)


@torch.no_grad()
def test_the_calls_step_callback_reaches_smoothing(pipe):
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, sorted(tensors)))
        return {}

    pipe(video=control_video(), prompt="a dog", num_inference_steps=2, mixing_ratio=0.5, output_type="latent",
         callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert seen == [(0, ["latents", "prompt_embeds"]), (1, ["latents", "prompt_embeds"])]
