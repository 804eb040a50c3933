"""How `bivdiff run` builds and calls each task's pipeline, checked with recording stand-ins that have the
documented signatures, so the wiring is tested even for pipelines that are not importable yet."""

from types import SimpleNamespace

import numpy as np
import pytest
from cli_helpers import FAST, only_run_folder, run_cli, save_tiny_checkpoints
from PIL import Image

import bivdiff
from bivdiff.config import QUALITY_NEGATIVE, QUALITY_SUFFIX
from bivdiff.video_io import read_video

NUM_FRAMES, SIZE = 3, 32


class Recorder:
    """Base of the stand-ins: keeps the components and the call, returns grey frames of the right size."""

    calls: list = []
    with_source_frames = False

    def __init__(self, **components):
        self.components = components
        for name, value in components.items():
            setattr(self, name, value)
        self.stage_log, self.current_stage = [], None

    def to(self, *args, **kwargs):
        return self

    def result(self, video, output_type):
        assert output_type == "pil"
        frames = [Image.new("RGB", video[0].size, (128, 128, 128)) for _ in video]
        extra = {"source_frames": [frames]} if self.with_source_frames else {}
        return SimpleNamespace(frames=[frames], idm_frames=[frames], **extra)


class InstructPix2PixStandIn(Recorder):
    def __call__(
        self,
        video,
        prompt,
        video_prompt=None,
        negative_prompt=None,
        image_guidance_scale=1.5,
        guidance_scale=7.5,
        cross_frame_attention=False,
        mixing_ratio=1.0,
        pool_norms_over_frames=True,
        reencode_frames=True,
        strength=1.0,
        num_inference_steps=50,
        frame_batch_size=8,
        decode_chunk_size=8,
        generator=None,
        output_type="np",
        height=None,
        width=None,
    ):
        Recorder.calls.append(dict(locals(), self=None))
        return self.result(video, output_type)


class InpaintStandIn(Recorder):
    def __call__(
        self,
        video,
        prompt="",
        video_prompt=None,
        mask=None,
        outpaint=None,
        paste_back=False,
        cross_frame_attention=False,
        mixing_ratio=0.1,
        pool_norms_over_frames=True,
        reencode_frames=True,
        strength=1.0,
        negative_prompt=None,
        guidance_scale=7.5,
        num_inference_steps=50,
        frame_batch_size=8,
        decode_chunk_size=8,
        generator=None,
        output_type="np",
        height=None,
        width=None,
    ):
        Recorder.calls.append(dict(locals(), self=None))
        return self.result(video, output_type)


class Prompt2PromptStandIn(Recorder):
    with_source_frames = True

    def __call__(
        self,
        video,
        source_prompt,
        prompt,
        video_prompt=None,
        edit_type="refine",
        cross_replace_steps=0.4,
        self_replace_steps=0.4,
        reweight=None,
        edit_with_ddim=True,
        upcast_editing=False,
        local_blend_words=None,
        local_blend_threshold=0.3,
        mixing_ratio=0.25,
        pool_norms_over_frames=True,
        reencode_frames=True,
        strength=1.0,
        negative_prompt=None,
        guidance_scale=7.5,
        num_inference_steps=50,
        frame_batch_size=8,
        decode_chunk_size=8,
        generator=None,
        output_type="np",
        height=None,
        width=None,
    ):
        Recorder.calls.append(dict(locals(), self=None))
        return self.result(video, output_type)


@pytest.fixture
def recorded(monkeypatch):
    """Install the stand-ins under the pipeline names and return the list of recorded calls."""
    monkeypatch.setattr(Recorder, "calls", [])
    instances = []

    def tracking(cls):
        class Tracked(cls):
            def __init__(self, **components):
                super().__init__(**components)
                instances.append(self)

        return Tracked

    monkeypatch.setattr(bivdiff, "BIVDiffInstructPix2PixPipeline", tracking(InstructPix2PixStandIn), raising=False)
    monkeypatch.setattr(bivdiff, "BIVDiffInpaintPipeline", tracking(InpaintStandIn), raising=False)
    monkeypatch.setattr(bivdiff, "BIVDiffPrompt2PromptPipeline", tracking(Prompt2PromptStandIn), raising=False)
    return SimpleNamespace(calls=Recorder.calls, pipes=instances)


def run_tiny(capsys, tmp_path, name, *overrides):
    code, _, err = run_cli(capsys, "run", "--tiny", "--config-name", name, "--output-dir", tmp_path, *FAST, *overrides)
    assert code == 0, err
    return only_run_folder(tmp_path)


def test_instruct_pix2pix_gets_an_8_channel_unet_and_the_quality_prompts(recorded, tmp_path, capsys):
    run_tiny(capsys, tmp_path, "video_editing_with_instruct_pix2pix_and_zeroscope")
    (call,) = recorded.calls
    (pipe,) = recorded.pipes
    assert pipe.unet.config.in_channels == 8 and pipe.inversion_unet.config.in_channels == 4
    assert call["prompt"] == "Make it minecraft style" + QUALITY_SUFFIX
    assert call["video_prompt"] == "A train is running, minecraft style" + QUALITY_SUFFIX
    assert call["negative_prompt"] == QUALITY_NEGATIVE
    assert call["image_guidance_scale"] == 1.5 and call["mixing_ratio"] == 1.0 and call["num_inference_steps"] == 2
    assert call["pool_norms_over_frames"] is True and call["reencode_frames"] is True  # the original's inversion
    assert call["strength"] == 1.0 and call["cross_frame_attention"] is False  # the original's frame-wise stage 1
    assert len(call["video"]) == NUM_FRAMES and call["video"][0].size == (SIZE, SIZE)


def test_the_inversion_switches_reach_the_call(recorded, tmp_path, capsys):
    name = "video_editing_with_instruct_pix2pix_and_zeroscope"
    overrides = ("MixedInversion.pool_norms_over_frames=false", "MixedInversion.reencode_frames=false",
                 "MixedInversion.strength=0.5")
    run_tiny(capsys, tmp_path, name, *overrides)
    (call,) = recorded.calls
    assert call["pool_norms_over_frames"] is False and call["reencode_frames"] is False and call["strength"] == 0.5


@pytest.mark.parametrize("name", ["video_editing_with_instruct_pix2pix_and_zeroscope",
                                  "video_inpainting_with_stable_diffusion_inpainting_and_vidrd"])
def test_cross_frame_attention_reaches_the_call(recorded, tmp_path, capsys, name):
    run_tiny(capsys, tmp_path, name, "Model.cross_frame_attention=true")
    (call,) = recorded.calls
    assert call["cross_frame_attention"] is True


def test_inpainting_gets_a_binary_mask_video_and_a_9_channel_unet(recorded, tmp_path, capsys):
    folder = run_tiny(capsys, tmp_path, "video_inpainting_with_stable_diffusion_inpainting_and_vidrd")
    (call,) = recorded.calls
    (pipe,) = recorded.pipes
    assert pipe.unet.config.in_channels == 9 and pipe.inversion_unet.config.in_channels == 4
    assert call["outpaint"] is None and call["paste_back"] is False and call["mixing_ratio"] == 0.1
    assert call["prompt"] == "" and call["video_prompt"] == ""
    assert (call["height"], call["width"]) == (SIZE, SIZE)
    masks = [np.asarray(m) for m in call["mask"]]
    assert len(masks) == NUM_FRAMES and set(np.unique(masks)) == {0, 255}
    assert masks[0][SIZE // 2, SIZE // 2] == 255 and masks[0][0, 0] == 0  # the shipped ellipse, centred
    assert len(read_video(folder / "source_mask.mp4")) == NUM_FRAMES


def test_inpainting_mask_shorter_than_the_selection_fails_before_models(recorded, tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "run",
        "--tiny",
        "--config-name",
        "video_inpainting_with_stable_diffusion_inpainting_and_vidrd",
        "--output-dir",
        tmp_path,
        *FAST,
        f"IDM.StableDiffusionInpainting.video_mask_path={short_mask(tmp_path)}",
    )
    assert code == 2 and "IDM.StableDiffusionInpainting.video_mask_path" in err and "has 2 frames" in err
    assert recorded.pipes == [] and not [p for p in tmp_path.iterdir() if p.is_dir()]


def short_mask(tmp_path):
    from bivdiff.video_io import write_video

    return write_video([Image.new("L", (32, 32), 255)] * 2, tmp_path / "mask.gif", fps=8)


def test_outpainting_passes_the_band_type_and_saves_the_band_mask(recorded, tmp_path, capsys):
    folder = run_tiny(
        capsys,
        tmp_path,
        "video_outpainting_with_stable_diffusion_inpainting_and_vidrd",
        "IDM.StableDiffusionOutpainting.mask_type=vertical",
        "IDM.StableDiffusionOutpainting.paste_back=true",
    )
    (call,) = recorded.calls
    assert call["outpaint"] == "vertical" and call["mask"] is None and call["paste_back"] is True
    mask = np.asarray(read_video(folder / "source_mask.gif")[0].convert("L"))
    assert mask[:, : SIZE // 4].min() > 200 and mask[:, SIZE // 4 : SIZE // 4 * 3].max() < 50


def test_prompt2prompt_maps_the_original_keys(recorded, tmp_path, capsys):
    folder = run_tiny(
        capsys,
        tmp_path,
        "video_editing_with_prompt2prompt_and_vidrd",
        "IDM.Prompt2Prompt.controller_type=AttentionReplace",
        "IDM.Prompt2Prompt.prompts=[A car is moving on the road, A bus is moving on the road]",
        "IDM.Prompt2Prompt.local_blend_words=[car, bus]",
    )
    (call,) = recorded.calls
    assert call["source_prompt"] == "A car is moving on the road"
    assert call["prompt"] == "A bus is moving on the road"
    assert call["video_prompt"] == "A car is moving on the road in the forest"
    assert call["edit_type"] == "replace" and call["local_blend_words"] == ["car", "bus"]
    assert (call["cross_replace_steps"], call["self_replace_steps"], call["mixing_ratio"]) == (0.4, 0.4, 0.25)
    assert (call["edit_with_ddim"], call["upcast_editing"], call["reweight"]) == (True, False, None)
    assert len(read_video(folder / "video_inverted_and_reconstructed.mp4")) == NUM_FRAMES


def test_prompt2prompt_restores_the_original_sampler_and_precision_and_reweights(recorded, tmp_path, capsys):
    run_tiny(
        capsys,
        tmp_path,
        "video_editing_with_prompt2prompt_and_vidrd",
        "IDM.Prompt2Prompt.scheduler=PNDM",
        "IDM.Prompt2Prompt.upcast_editing=true",
        "IDM.Prompt2Prompt.controller_type=AttentionReweight",
        "IDM.Prompt2Prompt.prompts=[A car is moving on the road, A car is moving on the road]",
        "IDM.Prompt2Prompt.reweight_words=[car, road]",
        "IDM.Prompt2Prompt.reweight_strengths=[2, 0.5]",
    )
    (original,) = recorded.calls
    assert (original["edit_with_ddim"], original["upcast_editing"]) == (False, True)
    assert original["edit_type"] == "reweight" and original["reweight"] == {"car": 2.0, "road": 0.5}


def test_prompt2prompt_without_blend_words_passes_none(recorded, tmp_path, capsys):
    run_tiny(capsys, tmp_path, "video_editing_with_prompt2prompt_and_vidrd")
    (call,) = recorded.calls
    assert call["local_blend_words"] is None and call["edit_type"] == "refine"


def test_instruct_pix2pix_loads_its_unet_and_sampler_from_its_own_folder(tmp_path, capsys, monkeypatch):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    import bivdiff.runner as runner
    from bivdiff.tiny_models import tiny_unet

    built, build = [], runner.build_pipeline
    monkeypatch.setattr(runner, "build_pipeline", lambda *args: built.append(build(*args)) or built[-1])

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoints = save_tiny_checkpoints(tmp_path / "checkpoints")
    ip2p = checkpoints / "InstructPix2Pix" / "instruct-pix2pix"
    tiny_unet(in_channels=8, seed=3).save_pretrained(ip2p / "unet")
    # Like timbrooks/instruct-pix2pix: an Euler sampler whose config has no DDIM-only keys.
    EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    ).save_pretrained(ip2p / "scheduler")
    code, _, err = run_cli(
        capsys,
        "run",
        "video_editing_with_instruct_pix2pix_and_zeroscope",
        "--checkpoints",
        checkpoints,
        "--offline",
        "--output-dir",
        tmp_path / "outputs",
        *FAST,
    )
    assert code == 0, err
    (pipe,) = built
    assert pipe.unet.config.in_channels == 8 and pipe.inversion_unet.config.in_channels == 4
    assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
    # Smoothing derives DDIM from this config: it must keep SD-1.5's settings, not DDIM's defaults.
    smoothing = DDIMScheduler.from_config(pipe.scheduler.config)
    assert smoothing.config.clip_sample is False and smoothing.config.set_alpha_to_one is False


def test_inputs_the_pipeline_refuses_are_reported_without_a_traceback(recorded, tmp_path, capsys, monkeypatch):
    def refuse(self, **kwargs):
        raise ValueError("`source_prompt` and `prompt` need the same number of tokens for 'replace'.")

    monkeypatch.setattr(Prompt2PromptStandIn, "__call__", refuse)
    code, out, err = run_cli(
        capsys, "run", "--tiny", "video_editing_with_prompt2prompt_and_vidrd", "--output-dir", tmp_path, *FAST
    )
    assert code == 1 and err.startswith("error: ") and "refused the inputs" in err and "same number of tokens" in err
    assert "Traceback" not in err
    folder = only_run_folder(tmp_path)
    assert "Traceback" in (folder / "error.txt").read_text() and "error.txt" in out
    assert not (folder / "stats.json").exists()


@pytest.mark.parametrize(
    "name, keys, arguments, output",
    [
        ("controllable_video_generation_with_controlnet_and_zeroscope",
         ["IDM.ControlNet.control_guidance_start=0.5", "IDM.ControlNet.guess_mode=true"],
         dict(control_guidance_start=0.5, guess_mode=True), "idm_frames"),
        ("controllable_video_generation_with_controlnet_and_animatediff", ["IDM.ControlNet.control_smoothing=true"],
         dict(control_smoothing=True), "frames"),
    ],
    ids=["guidance window and guess mode", "control smoothing"],
)
def test_controlnet_keys_reach_the_call_as_its_arguments(name, keys, arguments, output):
    import torch

    from bivdiff.config import valid_keys
    from bivdiff.runner import build_pipeline, call_arguments, plan_run, run_job

    plain, controlled = plan_run(name, FAST, tiny=True), plan_run(name, [*FAST, *keys], tiny=True)
    pipe = build_pipeline(plain)
    by_keys = np.stack(getattr(run_job(pipe, controlled)[0], output)[0])
    # Oracle: the same pipeline called from Python with the arguments.
    by_python = pipe(**{**call_arguments(plain, torch.Generator("cpu").manual_seed(42)), **arguments})
    np.testing.assert_array_equal(by_keys, np.stack(getattr(by_python, output)[0]))
    assert not np.array_equal(by_keys, np.stack(getattr(run_job(pipe, plain)[0], output)[0]))
    # T2I-Adapter has none of them (the pipeline refuses them for an adapter).
    adapter_keys = [key for key in valid_keys() if key.startswith("IDM.T2IAdapter.")]
    assert adapter_keys and not any(key.rsplit(".", 1)[1] in arguments for key in adapter_keys)
