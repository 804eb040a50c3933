"""BIVDiffPrompt2PromptPipeline: stage 1 against the stock DDIM pipeline and against itself (identical prompts,
chunking), end-to-end outputs, UNet call counts, save/load, custom_pipeline loading, and input errors."""

import ast
import pathlib

import numpy as np
import pytest
import torch
from bivdiff.pipelines.prompt2prompt_control import P2PAttnProcessor, make_controller
from diffusers import DDIMScheduler, StableDiffusionPipeline
from pipeline_helpers import (
    HEIGHT,
    NUM_FRAMES,
    WIDTH,
    all_models,
    bivdiff_components,
    control_video,
    count_forward_calls,
    pipeline_file,
)

from bivdiff import BIVDiffPrompt2PromptPipeline, BIVDiffPrompt2PromptPipelineOutput

PIPELINE_FILE = pipeline_file("pipeline_bivdiff_prompt2prompt.py")
STEPS = 2
SOURCE, EDIT = "a cat on a mat", "a dog on a mat"  # same token count with the byte-level tokenizer: "replace"


def inputs(**overrides):
    args = dict(
        video=control_video(),
        source_prompt=SOURCE,
        prompt=EDIT,
        local_blend_words=("cat", "dog"),
        num_inference_steps=STEPS,
        output_type="latent",
    )
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def pipe():
    pipe = BIVDiffPrompt2PromptPipeline(**bivdiff_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def edited(pipe):
    """One default run (all 3 frames in one chunk), latent outputs; shared by the oracles below."""
    return pipe(**inputs())


def stock_ddim_pipeline(pipe):
    stock = StableDiffusionPipeline(
        **{k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet")},
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    stock.set_progress_bar_config(disable=True)
    return stock


@torch.no_grad()
def source_noise(pipe):
    """The source video's inverted noise, as the pipeline makes it: posterior mean, image UNet on the "" prompt."""
    latents = pipe.encode_frames(pipe.source_pixels(control_video(), HEIGHT, WIDTH), NUM_FRAMES)
    cond = pipe.encode_prompt("", "cpu")[0]
    return pipe.invert_source(latents, cond, STEPS, NUM_FRAMES)


# ---------------------------------------------------------------------------------------------------------------
# stage 1 oracles
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit_type, reweight", [("replace", None), ("refine", None), ("reweight", {"cat": 1.0, "mat": 1.0})]
)
def test_same_prompt_edit_equals_source_reconstruction(pipe, edit_type, reweight):
    """Strength 1 with identical prompts is no edit, as for the other edit types."""
    out = pipe(
        **inputs(prompt=SOURCE, edit_type=edit_type, reweight=reweight, local_blend_words="cat", mixing_ratio=1.0)
    )
    assert out.idm_frames.shape == out.source_frames.shape == (1, 4, NUM_FRAMES, HEIGHT // 2, WIDTH // 2)
    assert (out.idm_frames - out.source_frames).abs().max().item() <= 1e-6


def test_source_reconstruction_equals_stock_ddim_pipeline_from_inverted_noise(pipe, edited):
    noise = source_noise(pipe)
    stock = stock_ddim_pipeline(pipe)
    for i in range(NUM_FRAMES):
        expected = stock(
            SOURCE, latents=noise[:, :, i], num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent"
        ).images
        assert (edited.source_frames[0, :, i] - expected[0]).abs().max().item() <= 1e-4


def test_without_attention_edits_the_edit_branch_is_the_stock_pipeline_on_the_edited_prompt(pipe):
    out = pipe(**inputs(cross_replace_steps=0.0, self_replace_steps=0.0, local_blend_words=None, mixing_ratio=1.0))
    noise = source_noise(pipe)
    stock = stock_ddim_pipeline(pipe)
    for i in range(NUM_FRAMES):
        expected = stock(
            EDIT, latents=noise[:, :, i], num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent"
        ).images
        assert (out.idm_frames[0, :, i] - expected[0]).abs().max().item() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("frame_batch_size", [1, 2])
def test_stage1_batched_equals_per_frame(pipe, frame_batch_size):
    noise = source_noise(pipe)
    (source, edit), (negative, _) = pipe.encode_prompt([SOURCE, EDIT], "cpu")

    def stage1(chunk):
        controller = make_controller(pipe.tokenizer, SOURCE, EDIT, "replace", STEPS, local_blend_words=("cat", "dog"))
        return pipe.edit_frames(
            noise, controller, torch.stack([source, edit]), negative[None], HEIGHT, WIDTH, STEPS, 7.5, chunk
        )

    (src_all, edit_all), (src, edit) = stage1(NUM_FRAMES), stage1(frame_batch_size)
    assert (edit - edit_all).abs().max().item() <= 1e-5 and (src - src_all).abs().max().item() <= 1e-5


def test_frame_batch_size_does_not_change_the_result(pipe, edited):
    # End to end the VAE and the inversion also run in chunks; their batch-size-dependent float rounding (~1e-6)
    # is amplified by guidance, hence a looser bound than stage 1 alone.
    out = pipe(**inputs(frame_batch_size=1))
    for got, expected in zip(out.to_tuple(), edited.to_tuple()):
        assert (got - expected).abs().max().item() <= 1e-4


def test_the_edit_changes_the_frames_and_leaves_the_processors_as_they_were(pipe, edited):
    assert (edited.idm_frames - edited.source_frames).abs().max().item() > 1e-3
    assert (edited.idm_frames[:, :, 0] - edited.idm_frames[:, :, 1]).abs().max().item() > 1e-3
    assert not any(isinstance(p, P2PAttnProcessor) for p in pipe.unet.attn_processors.values())


def test_edit_type_defaults_to_replace_for_equal_token_counts(pipe):
    assert pipe.resolve_edit_type("a cat", "a dog", None) == "replace"
    assert pipe.resolve_edit_type("a car", "a bicycle", None) == "refine"
    assert pipe.resolve_edit_type("a cat", "a dog", "refine") == "refine"


# ---------------------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------------------


def test_latent_output_layout(edited):
    assert isinstance(edited, BIVDiffPrompt2PromptPipelineOutput)
    for video in (edited.frames, edited.idm_frames, edited.source_frames):
        assert torch.is_tensor(video) and video.shape == (1, 4, NUM_FRAMES, HEIGHT // 2, WIDTH // 2)


def test_np_output_layout(pipe):
    out = pipe(**inputs(output_type="np"))
    for video in (out.frames, out.idm_frames, out.source_frames):
        assert isinstance(video, np.ndarray) and video.shape == (1, NUM_FRAMES, HEIGHT, WIDTH, 3)
        assert 0 <= video.min() and video.max() <= 1


def test_tuple_output_and_callback_on_smoothing_steps_only(pipe, edited):
    steps = []

    def callback(p, step, timestep, kwargs):
        steps.append(step)
        return {}

    out = pipe(**inputs(), return_dict=False, callback_on_step_end=callback)
    assert len(out) == 3 and steps == list(range(STEPS))
    for got, expected in zip(out, (edited.frames, edited.idm_frames, edited.source_frames)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "mixing_ratio, unet_calls, video_unet_calls",
    [
        # source inversion + editing (one batched CFG call per step) + image inversion; video inversion + smoothing
        (0.25, 3 * STEPS, 2 * STEPS),
        # r = 0 skips the image branch of Mixed Inversion, never the source inversion
        (0.0, 2 * STEPS, 2 * STEPS),
    ],
)
def test_unet_calls_per_stage(pipe, mixing_ratio, unet_calls, video_unet_calls):
    models = dict(unet=pipe.unet, video_unet=pipe.video_unet, encoder=pipe.vae.encoder, decoder=pipe.vae.decoder)
    with count_forward_calls(**models) as calls:
        out = pipe(**inputs(mixing_ratio=mixing_ratio, output_type="np", return_idm_frames=False))
    assert out.idm_frames is None and out.source_frames is None
    # the source, then the edited frames re-encoded (decoded to 8-bit and encoded again), then the output
    assert calls == {"unet": unet_calls, "video_unet": video_unet_calls, "encoder": 2, "decoder": 2}
    with count_forward_calls(**models) as calls:
        pipe(**inputs(mixing_ratio=mixing_ratio, output_type="np", return_idm_frames=False, reencode_frames=False))
    assert calls == {"unet": unet_calls, "video_unet": video_unet_calls, "encoder": 1, "decoder": 1}


def test_edits_of_one_source_share_its_inversion_without_a_generator(pipe):
    """Oracle: one call per edit. Without a generator both edits start from the same inverted source, which is
    computed once: the batch costs one source inversion (STEPS image-UNet calls) less than the two calls."""
    pairs = [(SOURCE, EDIT), ("a cat on a mat", "a cat on a rug")]
    # Without the 8-bit round trip, whose rounding turns float-level batching differences into 1/255 steps.
    args = dict(local_blend_words=None, output_type="latent", reencode_frames=False)
    with count_forward_calls(unet=pipe.unet) as calls:
        single = [pipe(**inputs(source_prompt=s, prompt=e, **args)) for s, e in pairs]
    with count_forward_calls(unet=pipe.unet) as batch_calls:
        batch = pipe(**inputs(source_prompt=[s for s, _ in pairs], prompt=[e for _, e in pairs], **args))
    for name in ("frames", "idm_frames", "source_frames"):
        expected = torch.cat([getattr(out, name) for out in single])
        torch.testing.assert_close(getattr(batch, name), expected, atol=1e-4, rtol=0)
    assert batch_calls["unet"] == calls["unet"] - STEPS


def test_file_is_a_self_contained_community_pipeline():
    tree = ast.parse(pathlib.Path(PIPELINE_FILE).read_text())
    relative = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert relative == {"mixed_inversion", "prompt2prompt_control"}
    pipelines = [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b) == "DiffusionPipeline" for b in node.bases)
    ]
    assert pipelines == ["BIVDiffPrompt2PromptPipeline"]


# ---------------------------------------------------------------------------------------------------------------
# errors before any model runs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(source_prompt="a car", prompt="a bicycle", edit_type="replace", local_blend_words=None), "same number"),
        (dict(local_blend_words=("cat", "truck")), r"'truck' is not a word of the edited prompt"),
        (dict(local_blend_words="dog"), r"'dog' is not a word of the source prompt"),
        (dict(source_prompt=""), "`source_prompt` must be a non-empty string"),
        (dict(prompt=" "), "`prompt` must be a non-empty string"),
        (dict(prompt=None), "`prompt` must be a non-empty string"),
        (dict(edit_type="swap"), "Unknown Prompt2Prompt edit_type"),
        (dict(edit_type="reweight"), "needs `reweight`"),
        (dict(cross_replace_steps={"truck": 0.5}), r"'truck' \(a key of `cross_replace_steps` or `reweight`\)"),
        (dict(height=30), "divisible by 8"),
        (dict(width=36, height=32), "divisible by 8"),
        (dict(mixing_ratio=1.5), "mixing_ratio"),
        (dict(video=[]), "`video` is required"),
        (dict(frame_batch_size=0), "frame_batch_size"),
        (dict(cross_replace_steps=2.0), "cross_replace_steps"),
    ],
)
def test_bad_input_fails_before_any_model_runs(pipe, overrides, message):
    with count_forward_calls(**all_models(pipe)) as calls:
        with pytest.raises(ValueError, match=message):
            pipe(**inputs(**overrides))
    assert sum(calls.values()) == 0


def test_stage1_ddim_from_another_samplers_config_neither_clips_nor_sets_alpha_to_one():
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = BIVDiffPrompt2PromptPipeline(**bivdiff_components(scheduler=scheduler))
    pipe.set_progress_bar_config(disable=True)
    built = []
    stock = pipe.stock_pipeline

    def spy(*args, **kwargs):
        if "scheduler" in kwargs:
            built.append(kwargs["scheduler"])
        return stock(*args, **kwargs)

    pipe.stock_pipeline = spy
    pipe(**inputs(mixing_ratio=1.0, return_idm_frames=False))
    assert len(built) == 1
    assert not built[0].config.clip_sample and not built[0].config.set_alpha_to_one


def test_edit_with_ddim_off_samples_with_the_pipeline_scheduler_as_the_original():
    """The original edited with SD-1.5's PNDM: `edit_with_ddim=False` gives the stock PNDM pipeline's frames."""
    from diffusers import PNDMScheduler

    config = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, skip_prk_steps=True
    )
    pipe = BIVDiffPrompt2PromptPipeline(**bivdiff_components(scheduler=PNDMScheduler(**config)))
    pipe.set_progress_bar_config(disable=True)
    args = inputs(mixing_ratio=1.0, cross_replace_steps=0.0, self_replace_steps=0.0, local_blend_words=None)
    out = pipe(**args, edit_with_ddim=False)
    noise = source_noise(pipe)
    stock = stock_ddim_pipeline(pipe)
    stock.scheduler = PNDMScheduler(**config)
    for i in range(NUM_FRAMES):
        expected = stock(
            SOURCE, latents=noise[:, :, i], num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent"
        ).images
        assert (out.source_frames[0, :, i] - expected[0]).abs().max().item() <= 1e-4
    assert (pipe(**args).source_frames - out.source_frames).abs().max() > 1e-3


def test_upcast_editing_runs_only_the_frame_wise_stage_in_float32():
    pipe = BIVDiffPrompt2PromptPipeline(**bivdiff_components()).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    try:
        pipe(**inputs(mixing_ratio=1.0, upcast_editing=True, return_idm_frames=False))
    finally:
        handle.remove()
    # source inversion, editing (CFG batched), image-branch inversion: STEPS calls each
    assert seen == [torch.bfloat16] * STEPS + [torch.float32] * STEPS + [torch.bfloat16] * STEPS
    assert pipe.unet.dtype == torch.bfloat16
