"""BIVDiffControllablePipeline with ControlNet: stage 1 against the stock pipeline, outputs, save/load, errors."""

import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
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

from bivdiff import BIVDiffControllablePipeline
from bivdiff.tiny_models import tiny_adapter, tiny_controlnet, tiny_text_encoder, tiny_video_unet



def make_pipe(**overrides):
    pipe = BIVDiffControllablePipeline(**bivdiff_components(**{"controlnet": tiny_controlnet(), **overrides}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(**overrides):
    args = dict(
        prompt="a red car",
        conditioning_frames=control_video(),
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


# ControlNet's guess mode and guidance window, as diffusers' ControlNet pipeline takes them.
CONTROLS = [dict(guess_mode=True), dict(control_guidance_start=0.3, control_guidance_end=0.7),
            dict(control_guidance_end=0.5)]


@torch.no_grad()
@pytest.mark.parametrize("frame_batch_size, controls", [(1, {}), (2, {}), (8, {}), *((2, c) for c in CONTROLS)])
def test_batched_stage1_equals_stock_pipeline_per_frame(pipe, frame_batch_size, controls):
    frames = control_video()
    ours = stage1(
        pipe, prompt="a red car", negative_prompt="ugly", conditioning_frames=frames, num_inference_steps=3,
        frame_batch_size=frame_batch_size, generator=generators(), **controls,
    )  # fmt: skip
    stock = StableDiffusionControlNetPipeline(
        **{k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "controlnet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    stock.set_progress_bar_config(disable=True)
    for i in range(NUM_FRAMES):
        expected = stock(
            "a red car",
            image=frames[i : i + 1],
            negative_prompt="ugly",
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(i),
            output_type="latent",
            **controls,
        ).images
        assert (ours[0, :, i] - expected[0]).abs().max().item() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("controls", CONTROLS)
def test_guess_mode_and_control_guidance_window_change_stage1(pipe, controls):
    """The tiny ControlNet acts, so each option changes the frames and the stock comparison is not vacuous."""

    def run(**extra):
        return stage1(pipe, prompt="a red car", conditioning_frames=control_video(), num_inference_steps=3,
                      generator=generators(), **extra)

    assert not torch.allclose(run(**controls), run(), atol=1e-4)


def test_one_generator_derives_the_same_frames_whatever_the_chunking(pipe):
    out = [
        pipe(**inputs(generator=torch.Generator().manual_seed(7), frame_batch_size=n, output_type="latent")).idm_frames
        for n in (1, 3)
    ]
    torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=0)


def test_same_seed_same_video_and_dict_tuple_agree(pipe):
    a = pipe(**inputs())
    b = pipe(**inputs(), return_dict=False)
    np.testing.assert_array_equal(a.frames, b[0])
    np.testing.assert_array_equal(a.idm_frames, b[1])
    c = pipe(**inputs(generator=generators(base=100)))
    assert np.abs(a.idm_frames - c.idm_frames).max() > 1e-3


def test_idm_frames_can_be_skipped(pipe):
    with count_forward_calls(vae=pipe.vae.decoder) as calls:
        out = pipe(**inputs(return_idm_frames=False, decode_chunk_size=2))
    assert out.idm_frames is None
    assert calls["vae"] == 4  # 3 frames in chunks of 2: the re-encoded frames and the final video
    with count_forward_calls(vae=pipe.vae.decoder) as calls:
        pipe(**inputs(return_idm_frames=False, decode_chunk_size=2, reencode_frames=False))
    assert calls["vae"] == 2  # final video only


def test_callback_zeroing_latents_on_last_step_gives_zero_output(pipe):
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append((step, sorted(kwargs)))
        if step == p.num_timesteps - 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return {}

    out = pipe(
        **inputs(output_type="latent"),
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )
    assert torch.count_nonzero(out.frames) == 0
    assert seen == [(0, ["latents", "prompt_embeds"]), (1, ["latents", "prompt_embeds"])]


def test_multi_controlnet_takes_one_video_per_net():
    pipe = make_pipe(controlnet=[tiny_controlnet(seed=1), tiny_controlnet(seed=2)])
    assert isinstance(pipe.controlnet, MultiControlNetModel)
    videos = [control_video(seed=1), control_video(seed=2)]
    out = pipe(**inputs(conditioning_frames=videos, controlnet_conditioning_scale=[1.0, 0.5]))
    assert out.frames.shape == (1, NUM_FRAMES, HEIGHT, WIDTH, 3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_frames=4), "one condition image per frame"),
        (dict(height=30), "divisible by 8"),
        (dict(width=36, height=32), "divisible by 8"),
        (dict(mixing_ratio=1.5), "mixing_ratio"),
        (dict(mixing_ratio=-0.1), "mixing_ratio"),
        (dict(prompt=""), "prompt"),
        (dict(latents=torch.zeros(1, 4, 2, 16, 16)), "frames"),
        (dict(control_guidance_start=0.6, control_guidance_end=0.4), "0 <= start < end <= 1"),
        (dict(control_guidance_end=1.5), "0 <= start < end <= 1"),
        (dict(control_guidance_start=[0.0, 0.1]), "one per ControlNet"),
    ],
)
def test_bad_input_fails_before_any_model_runs(pipe, overrides, message):
    with count_forward_calls(**all_models(pipe)) as calls:
        with pytest.raises(ValueError, match=message):
            pipe(**inputs(**overrides))
    assert sum(calls.values()) == 0


def test_video_model_of_another_latent_space_is_named():
    from diffusers import UNet3DConditionModel

    eight_channels = UNet3DConditionModel.from_config({**tiny_video_unet().config, "in_channels": 8})
    pipe = make_pipe(video_unet=eight_channels)
    with count_forward_calls(**all_models(pipe)) as calls:
        with pytest.raises(ValueError, match="8-channel latents but the VAE makes 4.*latent space"):
            pipe(**inputs())
    assert sum(calls.values()) == 0


def test_mismatched_video_text_encoder_is_named():
    pipe = make_pipe(video_text_encoder=tiny_text_encoder(hidden_size=32))
    with count_forward_calls(**all_models(pipe)) as calls:
        with pytest.raises(ValueError, match="video_unet` expects text embeddings of width 24"):
            pipe(**inputs())
    assert sum(calls.values()) == 0


@pytest.mark.parametrize("controls", CONTROLS)
def test_controlnet_only_options_are_refused_with_an_adapter_before_any_model_runs(controls):
    pipe = make_pipe(controlnet=None, adapter=tiny_adapter())
    with count_forward_calls(**all_models(pipe)) as calls, pytest.raises(ValueError, match="are ControlNet's"):
        pipe(**inputs(**controls))
    assert not any(calls.values())


def test_controlnet_and_adapter_are_exclusive():
    pipe = make_pipe(controlnet=None)
    with pytest.raises(ValueError, match="exactly one of `controlnet` and `adapter`"):
        pipe(**inputs())


def test_zero_mixing_ratio_skips_the_image_inversion():
    pipe = make_pipe(video_unet=tiny_video_unet(seed=3))
    with count_forward_calls(unet=pipe.unet, video_unet=pipe.video_unet) as calls:
        pipe(**inputs(mixing_ratio=0.0, num_inference_steps=2))
    # Stage 1 uses the image UNet with CFG in one call per step; stage 2 skips it at r = 0.
    assert calls == {"unet": 2, "video_unet": 2 + 2}


def test_stage_log_names_every_stage_in_order(pipe):
    start = time.perf_counter()
    pipe(**inputs())
    wall = time.perf_counter() - start
    stages = [entry["stage"] for entry in pipe.stage_log]
    assert stages == [
        "frame-wise generation",
        "decoding",  # the frames re-encoded for the inversion, as the original
        "VAE encoding",
        "image inversion",
        "video inversion",
        "temporal smoothing",
        "decoding",
        "decoding",
    ]
    seconds = [entry["seconds"] for entry in pipe.stage_log]
    assert all(s > 0 for s in seconds) and sum(seconds) <= wall  # stages run one after another within the call
    assert pipe.current_stage is None


def test_bfloat16_run_stays_close_to_float32():
    pipe = make_pipe()
    reference = pipe(**inputs()).frames
    pipe.to(dtype=torch.bfloat16)
    low = pipe(**inputs()).frames
    assert low.dtype == np.float32 and np.isfinite(low).all()
    assert np.abs(low - reference).max() < 0.15


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model CPU offload needs an accelerator")
def test_model_cpu_offload_gives_the_same_video():
    pipe = make_pipe().to("cuda")
    reference = pipe(**inputs(generator=[[torch.Generator("cuda").manual_seed(i) for i in range(NUM_FRAMES)]])).frames
    pipe = make_pipe()
    pipe.enable_model_cpu_offload()
    out = pipe(**inputs(generator=[[torch.Generator("cuda").manual_seed(i) for i in range(NUM_FRAMES)]])).frames
    np.testing.assert_allclose(out, reference, atol=1e-4)


@torch.no_grad()
def test_each_frames_noise_follows_its_documented_derivation(pipe):
    # Independently of the pipeline: F seeds drawn from the video's generator, one randn per frame from each seed.
    seeds = torch.randint(0, 2**62, (NUM_FRAMES,), generator=torch.Generator().manual_seed(5)).tolist()
    noise = torch.stack(
        [torch.randn(1, 4, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(s))[0] for s in seeds],
        dim=1,
    )[None]
    for a in range(NUM_FRAMES):
        for b in range(a + 1, NUM_FRAMES):
            assert not torch.allclose(noise[:, :, a], noise[:, :, b])
    from_generator = stage1(pipe, **inputs(generator=torch.Generator().manual_seed(5)))
    from_noise = stage1(pipe, **inputs(generator=None, latents=noise))
    torch.testing.assert_close(from_generator, from_noise, atol=0, rtol=0)


@torch.no_grad()
def test_a_lora_changes_stage1_and_unloading_restores_it(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = make_pipe()
    before = stage1(pipe, **inputs(generator=torch.Generator().manual_seed(0)))
    # A LoRA trained elsewhere, saved in diffusers' format; random B matrices so that it changes the UNet.
    donor = make_pipe().unet
    donor.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    BIVDiffControllablePipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(donor))

    pipe.load_lora_weights(tmp_path)
    with_lora = stage1(pipe, **inputs(generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(with_lora, before, atol=1e-4)
    pipe.unload_lora_weights()
    after = stage1(pipe, **inputs(generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


@torch.no_grad()
def test_a_textual_inversion_token_reaches_stage1_with_its_embedding():
    """Oracle: the loaded vector is the new token's row of the text encoder's embedding table, and a prompt that
    uses the token is encoded (and sampled) differently from one with an ordinary word in its place."""
    pipe = make_pipe()
    width = pipe.text_encoder.get_input_embeddings().embedding_dim
    vector = torch.randn(width, generator=torch.Generator().manual_seed(3))
    pipe.load_textual_inversion({"<toy>": vector}, token="<toy>")
    token_id = pipe.tokenizer.convert_tokens_to_ids("<toy>")
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[token_id], vector)
    with_token = pipe.encode_prompt("a <toy> car", "cpu")[0]
    assert not torch.allclose(with_token, pipe.encode_prompt("a red car", "cpu")[0], atol=1e-4)
    toy = stage1(pipe, **inputs(prompt="a <toy> car", generator=torch.Generator().manual_seed(0)))
    plain = stage1(pipe, **inputs(prompt="a red car", generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(toy, plain, atol=1e-4)
