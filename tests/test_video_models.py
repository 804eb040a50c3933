"""Every pipeline with every kind of video model: ZeroScope, ModelScope, AnimateDiff (a motion UNet sharing the
image UNet's weights) and VidRD, through the same (B, C, F, h, w) call; AnimateDiff's shared text encoder, the
Prompt2Prompt processors it must not see, save and load, and the default windows of the native clip length."""

import copy

import pytest
import torch
from pipeline_helpers import NUM_FRAMES, control_video, count_forward_calls
from test_pipeline_common import CASES, inputs
from video_model_helpers import VIDEO_MODELS, video_model_components

from bivdiff import BIVDiffControllablePipeline, BIVDiffPipeline
from bivdiff.pipelines.prompt2prompt_control import P2PAttnProcessor
from bivdiff.tiny_models import tiny_controlnet

STEPS = 2


def make(name: str, video_model: str, **overrides):
    cls, extra, _, _ = CASES[name]
    pipe = cls(**video_model_components(video_model, **{**copy.deepcopy(extra), **overrides}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
@pytest.mark.parametrize("video_model", VIDEO_MODELS)
def test_video_model_smooths_across_frames(video_model):
    pipe = make("bivdiff", video_model)
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


@torch.no_grad()
@pytest.mark.parametrize("video_model", [m for m in VIDEO_MODELS if m != "zeroscope"])  # ZeroScope: the default
@pytest.mark.parametrize("name", [n for n in CASES if n != "bivdiff"])
def test_every_pipeline_runs_with_every_video_model(name, video_model):
    pipe = make(name, video_model)
    with count_forward_calls(video_unet=pipe.video_unet) as calls:
        out = pipe(**inputs(name, mixing_ratio=0.5, num_inference_steps=STEPS)).frames
    assert out.shape == (1, 4, NUM_FRAMES, 16, 16) and torch.isfinite(out).all()
    assert calls["video_unet"] == 2 * STEPS


@torch.no_grad()
def test_animatediff_video_prompt_is_the_image_prompts_encoding_when_the_encoder_is_shared():
    shared = make("controllable", "animatediff")
    assert shared.video_text_encoder is shared.text_encoder
    # The oracle: the same weights as a second object, which the pipeline must encode with again.
    separate = make("controllable", "animatediff")
    separate.video_text_encoder = copy.deepcopy(separate.text_encoder)
    args = inputs("controllable", mixing_ratio=0.5, num_inference_steps=STEPS)
    with count_forward_calls(image=shared.text_encoder) as once:
        out = shared(**args).frames
    with count_forward_calls(image=separate.text_encoder, video=separate.video_text_encoder) as twice:
        expected = separate(**inputs("controllable", mixing_ratio=0.5, num_inference_steps=STEPS)).frames
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert once["image"] == twice["image"] == 2  # prompt and negative prompt
    assert twice["video"] == 2

    # A different video prompt is encoded by the (shared) encoder.
    with count_forward_calls(image=shared.text_encoder) as calls:
        shared(**inputs("controllable", mixing_ratio=0.5, num_inference_steps=1, video_prompt="a fast red car"))
    assert calls["image"] == 4


@torch.no_grad()
def test_prompt2prompt_processors_stay_out_of_the_shared_animatediff_unet_while_it_smooths():
    pipe = make("prompt2prompt", "animatediff")
    seen = {"unet": set(), "video_unet": set()}

    def record(name):
        def hook(_module, _args):
            seen[name] |= {type(p).__name__ for p in pipe.video_unet.attn_processors.values()}

        return hook

    handles = [getattr(pipe, n).register_forward_pre_hook(record(n)) for n in seen]
    try:
        pipe(**inputs("prompt2prompt", num_inference_steps=STEPS))
    finally:
        for handle in handles:
            handle.remove()
    # The motion UNet holds the image UNet's attention modules: during editing it sees the controller's
    # processors (so the check below can fail), during inversion and smoothing only its own.
    assert P2PAttnProcessor.__name__ in seen["unet"]
    assert P2PAttnProcessor.__name__ not in seen["video_unet"]


@torch.no_grad()
def test_saved_animatediff_pipeline_reloads_with_a_motion_unet(tmp_path):
    pipe = make("controllable", "animatediff")
    args = inputs("controllable", mixing_ratio=0.5, num_inference_steps=STEPS)
    expected = pipe(**args).frames
    pipe.save_pretrained(tmp_path)
    loaded = BIVDiffControllablePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.video_unet).__name__ == "UNetMotionModel"
    out = loaded(**inputs("controllable", mixing_ratio=0.5, num_inference_steps=STEPS)).frames
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_clip_longer_than_the_native_length_runs_in_native_windows_unless_the_user_chose():
    pipe = make("bivdiff", "zeroscope")
    pipe.video_unet.register_to_config(native_num_frames=NUM_FRAMES - 1)  # a tiny model "trained" on 2 frames
    args = dict(video=control_video(), prompt="a dog", mixing_ratio=0.0, num_inference_steps=1, output_type="latent")

    def run():
        with count_forward_calls(video_unet=pipe.video_unet) as calls:
            out = pipe(**args, generator=torch.Generator().manual_seed(0)).frames
        return out, calls["video_unet"]

    default, default_calls = run()
    pipe.enable_video_windows(size=NUM_FRAMES - 1, overlap=1)
    windowed, windowed_calls = run()
    pipe.disable_video_windows()
    whole, whole_calls = run()
    torch.testing.assert_close(default, windowed, atol=0, rtol=0)
    assert default_calls == windowed_calls == 2 * whole_calls  # two windows per step
    assert not torch.allclose(default, whole, atol=1e-5)

    # A clip no longer than the native length runs whole by default.
    pipe = make("bivdiff", "zeroscope")
    pipe.video_unet.register_to_config(native_num_frames=NUM_FRAMES)
    default, default_calls = run()
    torch.testing.assert_close(default, whole, atol=0, rtol=0)
    assert default_calls == whole_calls


@torch.no_grad()
@pytest.mark.parametrize("video_model", VIDEO_MODELS)
def test_from_pipe_turns_one_pipeline_into_another_sharing_every_model(video_model):
    """diffusers' `from_pipe`: a stock ControlNet pipeline and a video model become a controllable BIVDiff pipeline,
    which becomes a BIVDiffPipeline, each holding the other's very models. Oracle: the controllable pipeline built
    directly from the same components. A VidRD UNet, whose class the signature cannot name, is passed by name."""
    from diffusers import StableDiffusionControlNetPipeline

    components = video_model_components(video_model, controlnet=tiny_controlnet())
    components.pop("inverse_scheduler")
    image = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "controlnet")
    stock = StableDiffusionControlNetPipeline(**{name: components[name] for name in image}, safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
    video = {name: components[name] for name in ("video_unet", "video_text_encoder", "video_tokenizer")}
    controllable = BIVDiffControllablePipeline.from_pipe(stock, **video)
    by_name = {"video_unet": video["video_unet"]} if video_model == "vidrd" else {}
    plain = BIVDiffPipeline.from_pipe(controllable, **by_name)
    for pipe in (controllable, plain):
        models = {name: model for name, model in pipe.components.items() if isinstance(model, torch.nn.Module)}
        assert models and all(model is components[name] for name, model in models.items())
    assert plain.video_unet is components["video_unet"]
    direct = BIVDiffControllablePipeline(**components)
    for pipe in (controllable, direct):
        pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a car", conditioning_frames=control_video(), num_inference_steps=STEPS, output_type="latent")
    expected = direct(**args, generator=torch.Generator().manual_seed(0)).frames
    torch.testing.assert_close(controllable(**args, generator=torch.Generator().manual_seed(0)).frames, expected)


@torch.no_grad()
def test_a_compiled_animatediff_unet_takes_its_inputs_as_the_uncompiled_one():
    """`pipe.video_unet = torch.compile(pipe.video_unet)` (diffusers' idiom) wraps the motion UNet, which still reads
    its text embeddings repeated per frame. Oracle: the same call before compiling (eager backend: no compiler)."""
    pipe = make("bivdiff", "animatediff")
    sample, text = torch.randn(1, 4, NUM_FRAMES, 8, 8), torch.randn(1, 77, 32)
    expected = pipe.video_unet_noise(sample, 500, text)
    pipe.video_unet = torch.compile(pipe.video_unet, backend="eager")
    torch.testing.assert_close(pipe.video_unet_noise(sample, 500, text), expected, rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("video_model", VIDEO_MODELS)
def test_freeu_on_the_video_unet_changes_only_what_the_video_unet_does(video_model):
    """`pipe.video_unet.enable_freeu` (diffusers' own on ZeroScope, ModelScope and AnimateDiff; the port's on VidRD)
    reshapes the video branch of the inversion and smoothing, never stage 1: not even AnimateDiff's, whose motion UNet
    runs the image UNet's own layers. Turned off, the video is bit for bit the plain one."""
    pipe = make("controllable", video_model)

    def run():
        return pipe(**inputs("controllable", mixing_ratio=0.5, num_inference_steps=STEPS))

    plain = run()
    pipe.video_unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with_freeu = run()
    assert torch.equal(with_freeu.idm_frames, plain.idm_frames)
    assert (with_freeu.frames - plain.frames).abs().max() > 1e-3
    pipe.video_unet.disable_freeu()
    assert torch.equal(run().frames, plain.frames)
