"""BIVDiffInstructPix2PixPipeline: stage 1 against the stock pipeline, outputs, save/load, errors."""


import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from pipeline_helpers import (
    HEIGHT,
    NUM_FRAMES,
    WIDTH,
    all_models,
    bivdiff_components,
    control_video,
    count_forward_calls,
    generators,
    stage1,
)

from bivdiff import BIVDiffInstructPix2PixPipeline
from bivdiff.tiny_models import tiny_unet, tiny_video_unet



def make_pipe(**overrides):
    components = bivdiff_components(unet=tiny_unet(in_channels=8), inversion_unet=tiny_unet(in_channels=4, seed=1))
    components.update(overrides)
    pipe = BIVDiffInstructPix2PixPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(**overrides):
    args = dict(
        video=control_video(),
        prompt="make it red",
        video_prompt="a red scene",
        num_inference_steps=2,
        mixing_ratio=0.5,
        generator=generators(),
        output_type="np",
    )
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


@torch.no_grad()
@pytest.mark.parametrize("frame_batch_size", [1, 2, 8])
def test_batched_stage1_equals_stock_pipeline_per_frame(pipe, frame_batch_size):
    frames = control_video()
    ours = stage1(
        pipe, video=frames, prompt="make it red", video_prompt="a red video", negative_prompt="ugly",
        num_inference_steps=3, frame_batch_size=frame_batch_size, generator=generators(),
    )  # fmt: skip
    stock = StableDiffusionInstructPix2PixPipeline(
        **{k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    stock.set_progress_bar_config(disable=True)
    assert ours.shape == (1, 4, NUM_FRAMES, HEIGHT // 2, WIDTH // 2)
    for i in range(NUM_FRAMES):
        expected = stock(
            "make it red",
            image=frames[i : i + 1],
            negative_prompt="ugly",
            num_inference_steps=3,
            image_guidance_scale=1.5,
            generator=torch.Generator().manual_seed(i),
            output_type="latent",
        ).images
        assert (ours[0, :, i] - expected[0]).abs().max().item() <= 1e-4


def test_source_video_as_pil_numpy_or_tensor_reads_the_same(pipe):
    frames = control_video()
    as_pil = [PIL.Image.fromarray((f * 255).round().astype(np.uint8)) for f in frames]
    quantised = np.stack([np.asarray(im) / 255.0 for im in as_pil]).astype(np.float32)
    a = pipe.source_pixels(as_pil, HEIGHT, WIDTH)
    b = pipe.source_pixels(quantised, HEIGHT, WIDTH)
    c = pipe.source_pixels(torch.from_numpy(quantised).permute(0, 3, 1, 2), HEIGHT, WIDTH)
    assert a.shape == (NUM_FRAMES, 3, HEIGHT, WIDTH) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=0)


def test_default_size_is_the_video_size_rounded_down_to_8(pipe):
    out = pipe(**inputs(video=control_video(size=36), output_type="latent", return_idm_frames=False))
    assert out.frames.shape == (1, 4, NUM_FRAMES, 16, 16) and out.idm_frames is None


def test_video_guidance_scale_changes_only_smoothing(pipe):
    a = pipe(**inputs(output_type="latent"))
    b = pipe(**inputs(output_type="latent", video_guidance_scale=2.0))
    torch.testing.assert_close(a.idm_frames, b.idm_frames)
    assert not torch.allclose(a.frames, b.frames)


def test_inversion_uses_inversion_unet_and_zero_ratio_needs_none():
    pipe = make_pipe(video_unet=tiny_video_unet(seed=3))
    with count_forward_calls(unet=pipe.unet, inversion_unet=pipe.inversion_unet, video_unet=pipe.video_unet) as calls:
        pipe(**inputs(mixing_ratio=1.0, output_type="latent", return_idm_frames=False))
    # Stage 1: one 3x-CFG call per step; stage 2 image branch only; stage 3: one CFG call per step.
    assert calls == {"unet": 2, "inversion_unet": 2, "video_unet": 2}

    pipe.inversion_unet = None
    with count_forward_calls(unet=pipe.unet, video_unet=pipe.video_unet) as calls:
        out = pipe(**inputs(mixing_ratio=0.0))
    assert calls == {"unet": 2, "video_unet": 2 + 2}
    assert out.frames.shape == (1, NUM_FRAMES, HEIGHT, WIDTH, 3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(video_prompt=None), "`video_prompt` is required"),
        (dict(video_prompt="  "), "`video_prompt` is required"),
        (dict(prompt=""), "edit instruction"),
        (dict(video=[]), "`video` is required"),
        (dict(height=30), "divisible by 8"),
        (dict(width=36, height=32), "divisible by 8"),
        (dict(mixing_ratio=1.5), "mixing_ratio"),
        (dict(generator=generators(2)), "one per frame"),
        (dict(latents=torch.zeros(1, 4, 2, 16, 16)), "frames"),
        (dict(output_type="gif"), "output_type"),
        (dict(frame_batch_size=0), "frame_batch_size"),
    ],
)
def test_bad_input_fails_before_any_model_runs(pipe, overrides, message):
    with count_forward_calls(**all_models(pipe)) as calls:
        with pytest.raises(ValueError, match=message):
            pipe(**inputs(**overrides))
    assert sum(calls.values()) == 0


def test_image_inversion_without_inversion_unet_names_it_before_running():
    pipe = make_pipe(inversion_unet=None)
    with count_forward_calls(**all_models(pipe)) as calls:
        with pytest.raises(ValueError, match="Pass `inversion_unet`"):
            pipe(**inputs(mixing_ratio=1.0))
    assert sum(calls.values()) == 0


def test_plain_unet_in_place_of_instruct_pix2pix_is_refused():
    pipe = make_pipe(unet=tiny_unet(in_channels=4))
    with pytest.raises(ValueError, match="InstructPix2Pix UNet taking 8 channels"):
        pipe(**inputs())
