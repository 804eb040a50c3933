"""BIVDiffControllablePipeline with a T2I-Adapter: stage 1 against the stock adapter pipeline."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import MultiAdapter, StableDiffusionAdapterPipeline
from pipeline_helpers import HEIGHT, NUM_FRAMES, WIDTH, bivdiff_components, control_video, generators, stage1

from bivdiff import BIVDiffControllablePipeline
from bivdiff.tiny_models import tiny_adapter


def make_pipe(**overrides):
    pipe = BIVDiffControllablePipeline(**bivdiff_components(**{"adapter": tiny_adapter(), **overrides}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pil_frames(seed=0, mode="RGB"):
    return [PIL.Image.fromarray((f * 255).astype(np.uint8)).convert(mode) for f in control_video(seed=seed)]


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


@torch.no_grad()
def test_batched_stage1_equals_stock_adapter_pipeline_per_frame(pipe):
    frames = pil_frames()
    ours = stage1(
        pipe, prompt="a red car", conditioning_frames=frames, num_inference_steps=3, frame_batch_size=2,
        generator=generators(),
    )  # fmt: skip
    stock = StableDiffusionAdapterPipeline(
        **{k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "adapter", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    stock.set_progress_bar_config(disable=True)
    for i in range(NUM_FRAMES):
        expected = stock(
            "a red car",
            image=frames[i],
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(i),
            output_type="latent",
        ).images
        assert (ours[0, :, i] - expected[0]).abs().max().item() <= 1e-4


@torch.no_grad()
def test_condition_arrays_are_read_in_zero_one_like_images(pipe):
    frames = pil_frames()
    as_array = np.stack([np.asarray(f) for f in frames]).astype(np.float32) / 255.0
    run = lambda video: stage1(  # noqa: E731
        pipe, prompt="a red car", conditioning_frames=video, num_inference_steps=2, frame_batch_size=3,
        generator=generators(),
    )  # fmt: skip
    torch.testing.assert_close(run(frames), run(list(as_array)), atol=1e-5, rtol=0)
    # A [-1, 1] condition (the original's mistake) must give something else.
    assert not torch.allclose(run(frames), run(list(as_array * 2 - 1)), atol=1e-3)


def test_single_channel_canny_condition():
    pipe = make_pipe(adapter=tiny_adapter(in_channels=1))
    out = pipe(prompt="a car", conditioning_frames=pil_frames(mode="L"), num_inference_steps=2, generator=generators())
    assert out.frames.shape == (1, NUM_FRAMES, HEIGHT, WIDTH, 3)


def test_multi_adapter_end_to_end():
    pipe = make_pipe(adapter=[tiny_adapter(seed=1), tiny_adapter(seed=2)])
    assert isinstance(pipe.adapter, MultiAdapter)
    out = pipe(
        prompt="a car",
        conditioning_frames=[pil_frames(1), pil_frames(2)],
        adapter_conditioning_scale=[1.0, 0.5],
        num_inference_steps=2,
        mixing_ratio=0.5,
        generator=generators(),
    )
    assert out.frames.shape == (1, NUM_FRAMES, HEIGHT, WIDTH, 3)


def test_controlnet_and_adapter_together_are_refused():
    from bivdiff.tiny_models import tiny_controlnet

    pipe = make_pipe(controlnet=tiny_controlnet())
    with pytest.raises(ValueError, match="got both"):
        pipe(prompt="a car", conditioning_frames=pil_frames(), num_inference_steps=2)
