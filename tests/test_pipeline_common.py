"""What every BIVDiff pipeline must do as a diffusers pipeline, checked on each one (in the spirit of diffusers'
PipelineTesterMixin): save/load, optional components, dict vs tuple, batches of prompts and videos, encode_prompt,
callbacks, dtype, progress bars, early refusals and the CPU-offload order."""

from __future__ import annotations

import copy
import inspect
import json
import re

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from pipeline_helpers import all_models, bivdiff_components, control_video, count_forward_calls, pipeline_file

from bivdiff import (
    BIVDiffControllablePipeline,
    BIVDiffDDIMInverseScheduler,
    BIVDiffInpaintPipeline,
    BIVDiffInstructPix2PixPipeline,
    BIVDiffPipeline,
    BIVDiffPrompt2PromptPipeline,
)
from bivdiff.profiling import NetworkCallCounter
from bivdiff.tiny_models import tiny_controlnet, tiny_unet


def mask_video() -> np.ndarray:
    mask = np.zeros((3, 32, 32), dtype=np.float32)
    mask[:, 8:24, 8:24] = 1.0
    return mask


# name -> (class, extra components, call inputs, per-video inputs that take one entry per prompt)
CASES = {
    "bivdiff": (BIVDiffPipeline, {}, dict(video=control_video(), mixing_ratio=0.5), {"prompt": ["a dog", "a cat"]}),
    "controllable": (
        BIVDiffControllablePipeline,
        dict(controlnet=tiny_controlnet()),
        dict(conditioning_frames=control_video(), mixing_ratio=0.5),
        {"prompt": ["a red car", "a blue boat"]},
    ),
    "instruct_pix2pix": (
        BIVDiffInstructPix2PixPipeline,
        dict(unet=tiny_unet(8), inversion_unet=tiny_unet()),
        dict(video=control_video(), mixing_ratio=0.5),
        {"prompt": ["make it red", "make it blue"], "video_prompt": ["a red car", "a blue car"]},
    ),
    "inpaint": (
        BIVDiffInpaintPipeline,
        dict(unet=tiny_unet(9), inversion_unet=tiny_unet()),
        dict(video=control_video(), mask=mask_video(), mixing_ratio=0.5),
        {"prompt": ["a cat", "a dog"]},
    ),
    "prompt2prompt": (
        BIVDiffPrompt2PromptPipeline,
        {},
        dict(video=control_video(), cross_replace_steps=0.5, self_replace_steps=0.5),
        {"source_prompt": ["a cat sits", "a dog runs"], "prompt": ["a dog sits", "a cat runs"]},
    ),
}
NAMES = list(CASES)
FILES = {
    "bivdiff": "pipeline_bivdiff.py",
    "controllable": "pipeline_bivdiff_controllable.py",
    "instruct_pix2pix": "pipeline_bivdiff_instruct_pix2pix.py",
    "inpaint": "pipeline_bivdiff_inpaint.py",
    "prompt2prompt": "pipeline_bivdiff_prompt2prompt.py",
}
# Prompt2Prompt's stage 1 is deterministic (DDIM from the inverted source): its generator samples the VAE posterior.


def make_pipe(name, **overrides):
    cls, extra, _, _ = CASES[name]
    # Copies: a test that casts or offloads its pipeline must not change the models of the next one.
    pipe = cls(**bivdiff_components(**{**copy.deepcopy(extra), **overrides}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(name, video_index=0, **overrides):
    """Call inputs for one video: entry `video_index` of each per-video list."""
    _, _, args, per_video = CASES[name]
    args = dict(args, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    args.update({key: values[video_index] for key, values in per_video.items()})
    args.update(overrides)
    return args


def batch_inputs(name, **overrides):
    _, _, args, per_video = CASES[name]
    return {**inputs(name), **per_video, **overrides}


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    return request.param, make_pipe(request.param)


def seeded(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


LAYOUTS = {  # output_type -> the shape of `frames` for one video of F frames at H x W, and its value range
    "np": lambda f, h, w: (1, f, h, w, 3),
    "pt": lambda f, h, w: (1, f, 3, h, w),
    "latent": lambda f, h, w: (1, 4, f, h // 2, w // 2),
}


@pytest.mark.parametrize("output_type", [*LAYOUTS, "pil"])
@torch.no_grad()
def test_output_layouts_are_diffusers_video_layouts(case, output_type):
    name, pipe = case
    with_idm = name != "bivdiff"  # no stage 1, no frame-wise output
    out = pipe(**inputs(name, output_type=output_type, **({"return_idm_frames": True} if with_idm else {})))
    videos = [out.frames, out.idm_frames] if with_idm else [out.frames]
    for video in videos:
        if output_type == "pil":
            assert len(video) == 1 and len(video[0]) == 3 and video[0][0].size == (32, 32)
            continue
        assert tuple(video.shape) == LAYOUTS[output_type](3, 32, 32)
        if output_type != "latent":
            assert 0 <= float(video.min()) and float(video.max()) <= 1


@torch.no_grad()
def test_dict_and_tuple_outputs_agree(case):
    name, pipe = case
    as_dict = pipe(**inputs(name))
    as_tuple = pipe(**inputs(name), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(type(as_dict).__dataclass_fields__)
    torch.testing.assert_close(as_tuple[0], as_dict.frames, atol=0, rtol=0)
    assert as_dict.frames.shape == (1, 4, 3, 16, 16)


@torch.no_grad()
def test_a_list_of_two_prompts_equals_two_single_calls_with_matching_generators(case):
    # Without the 8-bit round trip, whose rounding turns float-level batching differences into 1/255 steps.
    name, pipe = case
    batched = pipe(**batch_inputs(name, generator=seeded(1, 2), reencode_frames=False)).frames
    singles = [
        pipe(**inputs(name, i, generator=torch.Generator().manual_seed(s), reencode_frames=False)).frames
        for i, s in ((0, 1), (1, 2))
    ]
    assert batched.shape[0] == 2
    torch.testing.assert_close(batched, torch.cat(singles), atol=1e-4, rtol=0)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


@torch.no_grad()
def test_num_videos_per_prompt_gives_one_video_per_generator(case):
    name, pipe = case
    out = pipe(**inputs(name, num_videos_per_prompt=2, generator=seeded(3, 4), reencode_frames=False)).frames
    singles = [
        pipe(**inputs(name, generator=torch.Generator().manual_seed(s), reencode_frames=False)).frames for s in (3, 4)
    ]
    torch.testing.assert_close(out, torch.cat(singles), atol=1e-4, rtol=0)


@torch.no_grad()
def test_encode_prompt_is_the_stock_pipelines_and_embeddings_replace_prompts(case):
    name, pipe = case
    stock = StableDiffusionPipeline(
        vae=None,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=None,
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ours = pipe.encode_prompt(["a cat", "a dog"], "cpu", 2, "ugly")
    expected = stock.encode_prompt(["a cat", "a dog"], "cpu", 2, True, ["ugly", "ugly"])
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert ours[0].shape[0] == 4

    if name in ("bivdiff", "prompt2prompt"):
        return  # BIVDiffPipeline's prompt is the video model's; Prompt2Prompt needs the words to align
    args = inputs(name)
    embeds, negative = pipe.encode_prompt(args["prompt"], "cpu")
    video_prompt = args.get("video_prompt", args["prompt"])
    video_embeds, video_negative = pipe.encode_video_prompt(video_prompt, "cpu")
    with_embeds = {k: v for k, v in args.items() if k not in ("prompt", "video_prompt")}
    out = pipe(
        **with_embeds,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        video_prompt_embeds=video_embeds,
        negative_video_prompt_embeds=video_negative,
    ).frames
    torch.testing.assert_close(out, pipe(**inputs(name)).frames, atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_callback_changing_the_guidance_scale_takes_effect(case):
    name, pipe = case

    def set_guidance(value):
        def callback(pipeline, step, timestep, callback_kwargs):
            pipeline._guidance_scale = value
            return callback_kwargs

        return callback

    plain = pipe(**inputs(name)).frames
    unchanged = pipe(**inputs(name, callback_on_step_end=set_guidance(7.5))).frames
    changed = pipe(**inputs(name, callback_on_step_end=set_guidance(1.0))).frames
    torch.testing.assert_close(unchanged, plain, atol=0, rtol=0)
    assert not torch.allclose(changed, plain, atol=1e-4)


@torch.no_grad()
def test_strength_keeps_its_share_of_inversion_and_smoothing_steps(case):
    """strength 0.5 of 4 steps: stage 1 as before, then the first 2 inversion steps and the last 2 smoothing steps
    (their math: `test_mixed_inversion.py`'s reference loops), each one network call on the whole clip.
    Prompt2Prompt's own inversion of the source, for its editing, stays whole."""
    name, pipe = case
    seen = {}
    for strength in (1.0, 0.5):
        with NetworkCallCounter(pipe) as counter:
            pipe(**inputs(name, num_inference_steps=4, strength=strength))
        seen[strength] = counter.as_dict()
    stage_1 = "frame-wise generation"
    assert seen[0.5].get(stage_1) == seen[1.0].get(stage_1)
    for stage in ("image inversion", "video inversion", "temporal smoothing"):
        assert sum(seen[1.0][stage].values()) - sum(seen[0.5][stage].values()) == 2, (stage, seen)
    assert pipe.num_timesteps == 2


def assert_same_components(a, b):
    """Equal component names and classes, equal weights for every model, equal settings for every scheduler."""
    classes = [{k: type(v).__name__ for k, v in pipe.components.items()} for pipe in (a, b)]
    assert classes[0] == classes[1]
    for name, component in a.components.items():
        other = b.components[name]
        if isinstance(component, torch.nn.Module):
            ours, theirs = component.state_dict(), other.state_dict()
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
        elif hasattr(component, "timesteps"):
            public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
            assert public(component.config) == public(other.config), name


@torch.no_grad()
def test_saved_pipeline_reloads_as_a_class_as_a_community_pipeline_and_without_the_inverse_scheduler(
    case, tmp_path, modules_cache
):
    name, pipe = case
    expected = pipe(**inputs(name)).frames
    pipe.save_pretrained(tmp_path / "full")
    index = json.loads((tmp_path / "full" / "model_index.json").read_text())
    assert index["inverse_scheduler"] == ["bivdiff.pipelines.mixed_inversion", "BIVDiffDDIMInverseScheduler"]
    community = DiffusionPipeline.from_pretrained(
        tmp_path / "full", custom_pipeline=pipeline_file(FILES[name]), trust_remote_code=True
    )
    assert type(community).__name__ == type(pipe).__name__
    assert type(community).__module__.startswith("diffusers_modules")  # the file, not the installed package
    for reloaded in (type(pipe).from_pretrained(tmp_path / "full"), community):
        reloaded.set_progress_bar_config(disable=True)
        assert_same_components(reloaded, pipe)
        torch.testing.assert_close(reloaded(**inputs(name)).frames, expected, atol=1e-5, rtol=0)

    # Without `inverse_scheduler` the pipeline builds the original's step from `scheduler.config`.
    bare = make_pipe(name, inverse_scheduler=None)
    bare.save_pretrained(tmp_path / "bare")
    loaded = type(pipe).from_pretrained(tmp_path / "bare")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.inverse_scheduler is None
    assert isinstance(loaded.inversion_scheduler, BIVDiffDDIMInverseScheduler)
    torch.testing.assert_close(loaded(**inputs(name)).frames, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_to_dtype_moves_every_model_and_still_runs(case):
    name, _ = case
    pipe = make_pipe(name).to(torch.bfloat16)
    assert {m.dtype for m in all_models(pipe).values()} == {torch.bfloat16}
    out = pipe(**inputs(name)).frames
    assert torch.isfinite(out.float()).all()


@torch.no_grad()
def test_progress_bar_config_silences_every_stage(case, capsys):
    name, pipe = case
    pipe.set_progress_bar_config(disable=False)
    pipe(**inputs(name))
    assert "Temporal smoothing" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(**inputs(name))
    assert "%|" not in capsys.readouterr().err  # no tqdm bar at all


BAD_OPTIONS = [
    (dict(num_inversion_steps=0), "num_inversion_steps"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(frame_batch_size=0), "frame_batch_size"),
    (dict(decode_chunk_size=0), "decode_chunk_size"),
    (dict(num_videos_per_prompt=0), "num_videos_per_prompt"),
    (dict(generator=seeded(0, 1, 2)), "one per video"),
    (dict(generator=[seeded(0, 1)]), "one per frame"),
    (dict(output_type="jpg"), "output_type"),
    (dict(resize_mode="stretch"), "resize_mode"),
    (dict(mixing_ratio=2.0), "mixing_ratio"),
    (dict(strength=0.0), "strength"),
    (dict(strength=1.5), "strength"),
    (dict(strength=0.3), "leaves no step of 2"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
]


@pytest.mark.parametrize("overrides, message", BAD_OPTIONS)
def test_bad_call_options_are_refused_before_any_model_runs(case, overrides, message):
    name, pipe = case
    with count_forward_calls(**all_models(pipe)) as calls:
        with pytest.raises(ValueError, match=message):
            pipe(**inputs(name, **overrides))
    assert sum(calls.values()) == 0


@torch.no_grad()
def test_cpu_offload_order_is_the_order_models_first_run(case):
    name, _ = case
    pipe = make_pipe(name)
    models = {k: v for k, v in all_models(pipe).items() if k in pipe.model_cpu_offload_seq.split("->")}
    order = []
    hooks = [
        module.register_forward_pre_hook(lambda *_, n=key: order.append(n) if n not in order else None)
        for key, module in models.items()
    ]
    try:
        pipe(**inputs(name, output_type="np", mixing_ratio=0.5))
    finally:
        for hook in hooks:
            hook.remove()
    declared = [m for m in pipe.model_cpu_offload_seq.split("->") if m in order]
    assert order == declared


def documented_arguments(doc: str) -> list[str]:
    """The argument names of a docstring's entries, `name (type): ...`, `a, b (type): ...` or `name: ...`, at the
    entry indent."""
    entries = re.findall(r"^ {12}(\w+(?:, \w+)*)(?: \(|:)", doc, re.M)
    return [name for entry in entries for name in entry.split(", ")]


def test_every_call_argument_is_documented_once(case):
    """The shared keywords reach every signature and docstring from one place; each pipeline's own come from it."""
    _, pipe = case
    names = [n for n in inspect.signature(pipe.__call__).parameters]
    documented = documented_arguments(type(pipe).__call__.__doc__)
    assert sorted(documented) == sorted(names)
    for shared in ("guidance_scale", "generator", "callback_on_step_end", "num_videos_per_prompt"):
        assert inspect.signature(pipe.__call__).parameters[shared].kind is inspect.Parameter.KEYWORD_ONLY


def test_an_unknown_keyword_is_refused_before_any_model_runs(case):
    name, pipe = case
    with count_forward_calls(**all_models(pipe)) as calls:
        with pytest.raises(TypeError, match="guidence_scale"):
            pipe(**inputs(name), guidence_scale=3.0)
    assert sum(calls.values()) == 0


@torch.no_grad()
def test_clip_skip_takes_the_prompt_from_an_earlier_clip_layer(case):
    """Oracle: the hidden state `clip_skip` layers before the last, through CLIP's final layer norm (diffusers'
    definition). diffusers reads that norm at `text_encoder.text_model`, which transformers 5 removed."""
    name, pipe = case
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    ids = tokenizer(["a cat"], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    hidden = encoder(ids.input_ids, output_hidden_states=True).hidden_states
    skipped, _ = pipe.encode_prompt("a cat", "cpu", clip_skip=1)
    torch.testing.assert_close(skipped, encoder.final_layer_norm(hidden[-2]), atol=1e-6, rtol=0)
    assert not torch.allclose(skipped, pipe.encode_prompt("a cat", "cpu")[0], atol=1e-3)
    assert "text_model" not in vars(encoder)
    if name not in ("bivdiff", "prompt2prompt"):  # no stage-1 prompt / source and edit prompts must align
        out = pipe(**inputs(name, clip_skip=1, return_idm_frames=True)).idm_frames
        assert not torch.allclose(out, pipe(**inputs(name, return_idm_frames=True)).idm_frames, atol=1e-4)


@torch.no_grad()
def test_a_lora_scale_in_cross_attention_kwargs_works_as_in_diffusers(case):
    """Oracle: the pipeline without the LoRA. `scale` 0 turns the UNet's LoRA off for that call only, as in the stock
    pipelines; the next call has it back at full strength."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    name, _ = case
    pipe = make_pipe(name)
    without = pipe(**inputs(name)).frames
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    with_lora = pipe(**inputs(name)).frames
    assert not torch.allclose(with_lora, without, atol=1e-4)
    torch.testing.assert_close(pipe(**inputs(name, cross_attention_kwargs={"scale": 0.0})).frames, without)
    torch.testing.assert_close(pipe(**inputs(name)).frames, with_lora)


@torch.no_grad()
def test_freeu_and_fused_projections_work_as_on_stable_diffusion_pipelines(case):
    """diffusers' StableDiffusionMixin on the image model. Oracles: the pipeline as it was before each switch (FreeU
    changes the frames and disabling it restores them exactly; fused projections compute the same attention)."""
    name, _ = case
    pipe = make_pipe(name)

    def run():  # without the 8-bit round trip, whose rounding turns float-level differences into 1/255 steps
        return pipe(**inputs(name, reencode_frames=False)).frames

    before = run()
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert not torch.allclose(run(), before, atol=1e-4)
    pipe.disable_freeu()
    torch.testing.assert_close(run(), before, atol=0, rtol=0)
    pipe.fuse_qkv_projections()
    torch.testing.assert_close(run(), before, atol=1e-4, rtol=0)
    pipe.unfuse_qkv_projections()
    torch.testing.assert_close(run(), before, atol=0, rtol=0)
