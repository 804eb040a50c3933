"""Stage 1 with `cross_frame_attention`: every frame's self-attention reads its video's first frame, as diffusers'
Text2Video-Zero processor does on a whole clip in one batch. The oracle is that processor set on the stock
pipeline's own models, run on all frames at once; chunked frame batches must give the same frames."""

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
)
from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero import (
    CrossFrameAttnProcessor2_0,
)
from pipeline_helpers import all_models, bivdiff_components, control_video, count_forward_calls, stage1

from bivdiff import BIVDiffControllablePipeline, BIVDiffInpaintPipeline, BIVDiffInstructPix2PixPipeline
from bivdiff.pipelines.mixed_inversion import frame_batches
from bivdiff.tiny_models import tiny_adapter, tiny_controlnet, tiny_unet

F = 4
FRAMES = control_video(F)
MASKS = np.zeros((F, 32, 32), dtype=np.float32)
MASKS[:, 8:24, 4:20] = 1.0
PIL_FRAMES = [PIL.Image.fromarray((frame * 255).astype(np.uint8)) for frame in FRAMES]
# name -> (pipeline class, its own components, stock class, the stock models given cross-frame attention, the call's
# inputs, the stock call's inputs for the same frames, its guidance copies)
CASES = {
    "controlnet": (
        BIVDiffControllablePipeline, dict(controlnet=tiny_controlnet()), StableDiffusionControlNetPipeline,
        ("unet", "controlnet"), dict(conditioning_frames=FRAMES), dict(image=FRAMES), 2,
    ),
    "t2i_adapter": (
        BIVDiffControllablePipeline, dict(adapter=tiny_adapter()), StableDiffusionAdapterPipeline, ("unet",),
        dict(conditioning_frames=PIL_FRAMES), dict(image=PIL_FRAMES), 2,
    ),
    "instruct_pix2pix": (
        BIVDiffInstructPix2PixPipeline, dict(unet=tiny_unet(8), inversion_unet=tiny_unet()),
        StableDiffusionInstructPix2PixPipeline, ("unet",), dict(video=FRAMES, video_prompt="a red car"),
        dict(image=FRAMES), 3,
    ),
    "inpaint": (
        BIVDiffInpaintPipeline, dict(unet=tiny_unet(9), inversion_unet=tiny_unet()), StableDiffusionInpaintPipeline,
        ("unet",), dict(video=FRAMES, mask=MASKS), dict(image=FRAMES, mask_image=MASKS), 2,
    ),
}  # fmt: skip


def frame_generators(base: int = 0) -> list[list[torch.Generator]]:
    return [[torch.Generator().manual_seed(base + i) for i in range(F)]]


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    cls, own, *_ = CASES[request.param]
    pipe = cls(**bivdiff_components(**own))
    # An ancestral sampler draws noise from each frame's generator at every step, so a first frame computed again
    # in a later batch must restart from its generator's first state.
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def run(name, pipe, **extra):
    inputs = CASES[name][4]
    return stage1(pipe, prompt="a red car", negative_prompt="ugly", num_inference_steps=3,
                  generator=frame_generators(), **inputs, **extra)


@torch.no_grad()
def test_stage1_equals_diffusers_cross_frame_processor_on_the_whole_clip(case):
    name, pipe = case
    _, own, stock_class, crossed, _, stock_inputs, copies = CASES[name]
    keys = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", *({"controlnet", "adapter"} & set(own)))
    models = {key: getattr(pipe, key) for key in keys}
    for key in crossed:
        models[key] = copy.deepcopy(getattr(pipe, key))
        models[key].set_attn_processor(CrossFrameAttnProcessor2_0(batch_size=copies))
    stock = stock_class(**models, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    expected = stock(
        ["a red car"] * F, negative_prompt=["ugly"] * F, num_inference_steps=3, generator=frame_generators()[0],
        output_type="latent", **stock_inputs,
    ).images  # fmt: skip
    for frame_batch_size in (3, 2):  # 4 frames: batches [0 1 2] [0 3], then [0 1] [0 2] [0 3]
        ours = run(name, pipe, cross_frame_attention=True, frame_batch_size=frame_batch_size)
        torch.testing.assert_close(ours[0].transpose(0, 1), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_the_first_frame_is_unchanged_and_the_others_read_it(case):
    name, pipe = case
    plain = run(name, pipe)
    crossed = run(name, pipe, cross_frame_attention=True, frame_batch_size=2)
    torch.testing.assert_close(crossed[:, :, 0], plain[:, :, 0], atol=1e-5, rtol=0)
    assert (crossed[:, :, 1:] - plain[:, :, 1:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3


@torch.no_grad()
def test_processors_are_restored_for_the_inversion_and_the_next_call(case):
    name, pipe = case
    models = [pipe.unet, getattr(pipe, "controlnet", None)]
    before = [dict(m.attn_processors) for m in models if m is not None]
    plain = run(name, pipe)
    run(name, pipe, cross_frame_attention=True)
    assert [dict(m.attn_processors) for m in models if m is not None] == before
    torch.testing.assert_close(run(name, pipe), plain, atol=0, rtol=0)


@torch.no_grad()
def test_each_video_of_a_batch_reads_its_own_first_frame():
    name = "controlnet"
    cls, own, *_ = CASES[name]
    pipe = cls(**bivdiff_components(**copy.deepcopy(own)))
    pipe.set_progress_bar_config(disable=True)
    common = dict(conditioning_frames=FRAMES, num_inference_steps=2, cross_frame_attention=True)
    singles = [stage1(pipe, prompt=p, generator=frame_generators(b), frame_batch_size=3, **common)
               for p, b in (("a red car", 0), ("a blue boat", 10))]
    for frame_batch_size in (3, 2 * F):  # each video split over calls; both videos in one call
        batched = stage1(pipe, prompt=["a red car", "a blue boat"], frame_batch_size=frame_batch_size,
                         generator=[frame_generators(0)[0], frame_generators(10)[0]], **common)
        torch.testing.assert_close(batched, torch.cat(singles), atol=1e-4, rtol=0)  # the batching tolerance


@pytest.mark.parametrize(
    "num_videos, num_frames, size", [(1, 4, 4), (1, 4, 2), (2, 5, 3), (3, 7, 4), (2, 1, 1), (3, 2, 5), (2, 3, 7)]
)
def test_anchored_frame_batches_hold_whole_videos_or_part_of_one_led_by_its_first_frame(num_videos, num_frames, size):
    batches = frame_batches(num_videos, num_frames, size, anchored=True)
    seen, new = set(), []
    for k, batch in enumerate(batches):
        assert len(batch) <= size
        if num_frames <= size:  # whole videos, as many as fit in a call
            assert len(batch) % num_frames == 0 and batch == list(range(batch[0], batch[0] + len(batch)))
            assert len(batch) == size // num_frames * num_frames or k == len(batches) - 1
        else:  # part of one video, led by its first frame; full, but for the video's last part
            assert len({i // num_frames for i in batch}) == 1 and batch[0] % num_frames == 0
            assert len(batch) == size or batch[-1] % num_frames == num_frames - 1
        assert all(i not in seen for i in batch[1:])  # only a video's first frame is computed again
        new += [i for i in batch if i not in seen]
        seen.update(batch)
    assert new == list(range(num_videos * num_frames))  # every frame once, in order
    plain = frame_batches(num_videos, num_frames, size)
    assert [i for batch in plain for i in batch] == new and all(len(batch) == size for batch in plain[:-1])


@pytest.mark.parametrize("overrides, message", [
    (dict(cross_frame_attention=True, frame_batch_size=1), "frame_batch_size` >= 2"),
    (dict(cross_frame_attention="yes"), "must be True or False"),
])  # fmt: skip
def test_bad_cross_frame_options_are_refused_before_any_model_runs(overrides, message):
    cls, own, *_ = CASES["controlnet"]
    pipe = cls(**bivdiff_components(**own))
    with count_forward_calls(**all_models(pipe)) as calls, pytest.raises(ValueError, match=message):
        stage1(pipe, prompt="a red car", conditioning_frames=FRAMES, num_inference_steps=2, **overrides)
    assert not any(calls.values())


@torch.no_grad()
def test_an_ip_adapter_keeps_its_cross_attention_beside_cross_frame_self_attention():
    """Only self-attention reads the first frame; the adapter's cross-attention processors stay in place."""
    from test_ip_adapter import image_side, load_tiny_ip_adapter, reference_image

    pipe = BIVDiffControllablePipeline(**bivdiff_components(controlnet=tiny_controlnet(), **image_side()))
    pipe.set_progress_bar_config(disable=True)
    load_tiny_ip_adapter(pipe)
    image = dict(ip_adapter_image=reference_image(), conditioning_frames=FRAMES)
    ours = stage1(pipe, prompt="a red car", num_inference_steps=2, generator=frame_generators(),
                  cross_frame_attention=True, frame_batch_size=2, **image)
    unet, controlnet = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.controlnet)
    for model in (unet, controlnet):
        crossed = CrossFrameAttnProcessor2_0(batch_size=2)
        model.set_attn_processor({name: crossed if name.endswith("attn1.processor") else processor
                                  for name, processor in model.attn_processors.items()})
    stock = StableDiffusionControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet, controlnet=controlnet,
        scheduler=pipe.scheduler, safety_checker=None, requires_safety_checker=False, **image_side(),
    )  # fmt: skip
    stock.set_progress_bar_config(disable=True)
    embeds = stock.prepare_ip_adapter_image_embeds(reference_image(), None, "cpu", F, True)
    expected = stock(["a red car"] * F, image=FRAMES, num_inference_steps=2, generator=frame_generators()[0],
                     ip_adapter_image_embeds=embeds, output_type="latent").images
    torch.testing.assert_close(ours[0].transpose(0, 1), expected, atol=1e-5, rtol=0)
    pipe.set_ip_adapter_scale(0.0)
    unscaled = stage1(pipe, prompt="a red car", num_inference_steps=2, generator=frame_generators(),
                      cross_frame_attention=True, frame_batch_size=2, **image)
    assert (ours - unscaled).abs().max() > 1e-3  # the adapter acts, so a lost cross-attention would show


@torch.no_grad()
def test_without_a_generator_a_first_frame_computed_again_draws_the_same_noise():
    """Unseeded, each frame is given a generator seeded from torch's global one, so the first frame carried by a
    later batch repeats its own noise (an ancestral sampler draws some at every step) and the batching changes
    nothing."""
    cls, own, *_ = CASES["controlnet"]
    pipe = cls(**bivdiff_components(**own))
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    runs = []
    for frame_batch_size in (F, 2):
        torch.manual_seed(3)
        runs.append(stage1(pipe, prompt="a red car", conditioning_frames=FRAMES, num_inference_steps=3,
                           cross_frame_attention=True, frame_batch_size=frame_batch_size))
    torch.testing.assert_close(runs[1], runs[0], atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("cross_frame_attention", [False, True])
def test_without_a_generator_torch_manual_seed_reproduces_stage_1(cross_frame_attention):
    """diffusers' convention: no generator means torch's global one."""
    cls, own, *_ = CASES["controlnet"]
    pipe = cls(**bivdiff_components(**own))
    pipe.set_progress_bar_config(disable=True)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(stage1(pipe, prompt="a red car", conditioning_frames=FRAMES, num_inference_steps=2,
                           cross_frame_attention=cross_frame_attention, frame_batch_size=2))
    torch.testing.assert_close(runs[1], runs[0], atol=0, rtol=0)
    assert (runs[2] - runs[0]).abs().max() > 1e-3
