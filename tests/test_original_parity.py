"""Stage by stage against the original release's own code, recorded on tiny models (tests/fixtures/
original_bivdiff_parity.*; its json says how it was made). Everything runs in float64 like the recording, so the
tolerances measure the algorithm, not float32 rounding (which alone moves a 5-step inversion by ~1.5e-5)."""

from __future__ import annotations

import contextlib
import json
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet3DConditionModel
from diffusers.image_processor import VaeImageProcessor
from safetensors.torch import load_file

from bivdiff.schedulers import BIVDiffDDIMInverseScheduler
from bivdiff.tiny_models import sd15_scheduler_config, tiny_text_encoder, tiny_tokenizer, tiny_vae
from bivdiff.pipelines.mixed_inversion import fold_frames, pool_group_norms_over_frames, unfold_frames

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "original_bivdiff_parity"
DTYPE = torch.float64


def formula_weights_(model: torch.nn.Module) -> torch.nn.Module:
    """Sets every float parameter from a splitmix64 hash of its name and index: no torch RNG, so the recording and
    these tests build identical models whatever the library versions. Norm weights near 1, other vectors near 0,
    matrices uniform with variance 1 / fan_in."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            n = param.numel()
            x = np.arange(n, dtype=np.uint64) + np.uint64(zlib.crc32(name.encode()) << 20)
            z = x + np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            u = (z >> np.uint64(40)).astype(np.float64) / 2.0**24 * 2 - 1
            if param.ndim == 1:
                value = (1.0 if name.endswith("weight") and "norm" in name else 0.0) + 0.1 * u
            else:
                value = u * np.sqrt(3.0 / (n // param.shape[0]))
            param.copy_(torch.from_numpy(value.reshape(tuple(param.shape))).to(param.dtype))
    return model.eval()


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads(FIXTURE.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def rec() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE.with_suffix(".safetensors")))


@pytest.fixture(scope="module")
def models(meta) -> dict:
    built = dict(
        unet=UNet2DConditionModel(**meta["image_unet"]),
        video_unet=UNet3DConditionModel(**meta["video_unet"]),
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(32),
        video_text_encoder=tiny_text_encoder(24),
    )
    return {k: formula_weights_(m).to(DTYPE) for k, m in built.items()} | {"tokenizer": tiny_tokenizer()}


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max abs, RMS) of a - b."""
    d = a.double() - b.double()
    return d.abs().max().item(), d.pow(2).mean().sqrt().item()


def inverse_scheduler(meta) -> BIVDiffDDIMInverseScheduler:
    scheduler = BIVDiffDDIMInverseScheduler(**sd15_scheduler_config())
    scheduler.set_timesteps(meta["num_inference_steps"])
    return scheduler


@torch.no_grad()
def invert_image(models, meta, z0, cond, pooled: bool = True) -> torch.Tensor:
    """The image branch as a reference loop: frames folded into the batch, ResNet statistics pooled per clip."""
    unet, num_frames = models["unet"], z0.shape[2]
    scheduler = inverse_scheduler(meta)
    z = fold_frames(z0)
    cond = cond.expand(z.shape[0], -1, -1)
    for t in scheduler.timesteps:
        if pooled:
            with pool_group_norms_over_frames(unet, num_frames):
                eps = unet(z, t, encoder_hidden_states=cond).sample
        else:
            eps = unet(z, t, encoder_hidden_states=cond).sample
        z = scheduler.step(eps, t, z).prev_sample
    return unfold_frames(z, num_frames)


@torch.no_grad()
def invert_video(models, meta, z0, cond) -> torch.Tensor:
    scheduler = inverse_scheduler(meta)
    z = z0
    for t in scheduler.timesteps:
        z = scheduler.step(models["video_unet"](z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
    return z


@torch.no_grad()
def smooth(models, meta, z_T, prompt_embeds, negative_embeds) -> torch.Tensor:
    """Plain DDIM (eta 0) with batched CFG over the video UNet, SD-1.5 settings."""
    scheduler = DDIMScheduler(**sd15_scheduler_config())
    scheduler.set_timesteps(meta["num_inference_steps"])
    embeds = torch.cat([negative_embeds, prompt_embeds])
    z = z_T
    for t in scheduler.timesteps:
        uncond, text = models["video_unet"](torch.cat([z, z]), t, encoder_hidden_states=embeds).sample.chunk(2)
        z = scheduler.step(uncond + meta["guidance_scale"] * (text - uncond), t, z).prev_sample
    return z


@torch.no_grad()
def embed(models, encoder: str, text: str) -> torch.Tensor:
    ids = models["tokenizer"](text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return models[encoder](ids.input_ids)[0]


def test_prompts_tokenize_and_encode_alike(models, meta, rec):
    prompt = meta["vdm_prompt"] + meta["pos_prompt"]
    for name, encoder, text in [
        ("image_negative", "text_encoder", meta["negative_prompt"]),
        ("video_negative", "video_text_encoder", meta["negative_prompt"]),
        ("video_prompt", "video_text_encoder", prompt),
    ]:
        ids = models["tokenizer"](text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        assert torch.equal(ids.input_ids, rec[f"{name}.input_ids"])
        assert diff(embed(models, encoder, text), rec[f"{name}.embeds"])[0] < 1e-10


@torch.no_grad()
def test_decode_to_8bit_frames_matches(models, rec):
    """IDM latents -> VAE decode -> [0, 1] -> rounded 8-bit frames, as the stock SD pipelines return them."""
    vae = models["vae"]
    pixels = vae.decode(rec["idm_latents"].to(DTYPE) / vae.config.scaling_factor).sample
    frames = VaeImageProcessor(vae_scale_factor=2).postprocess(pixels, output_type="pil")
    assert np.array_equal(np.stack([np.asarray(f) for f in frames]), rec["idm_frames_u8"].numpy())


@torch.no_grad()
def test_reencode_matches_posterior_mean_and_sample(models, rec):
    """8-bit frames -> [-1, 1] -> VAE encode: the mean, and the sample with the recorded noise (one draw)."""
    vae = models["vae"]
    frames = [frame.numpy() for frame in rec["idm_frames_u8"]]
    pixels = VaeImageProcessor(vae_scale_factor=2).preprocess([PIL.Image.fromarray(f) for f in frames])
    # The original's conversion: uint8 / 255 in float32, then 2x - 1.
    unit = torch.from_numpy(np.stack(frames).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    assert torch.equal(pixels, unit * 2 - 1)
    dist = vae.encode(pixels.to(DTYPE)).latent_dist
    scale = vae.config.scaling_factor
    # 1e-6, not float64 precision: diffusers 0.14's VAE attention took its softmax in float32.
    assert diff(unfold_frames(dist.mean * scale, 8), rec["z0_mean"])[0] < 1e-6
    sample = (dist.mean + dist.std * rec["posterior_noise"]) * scale
    assert diff(unfold_frames(sample, 8), rec["z0"])[0] < 1e-6
    # diffusers' sample(generator) draws the same noise as the seeded global RNG did.
    drawn = dist.sample(generator=torch.Generator().manual_seed(1234))
    assert diff(drawn * scale, fold_frames(rec["z0"]))[0] < 1e-6


def test_image_branch_inversion_pools_norms_over_frames(models, meta, rec):
    ours = invert_image(models, meta, rec["z0"], rec["image_negative.embeds"])
    assert diff(ours, rec["mixed_r1.0"])[0] < 1e-5


def test_per_frame_statistics_differ_from_the_original(models, meta, rec):
    per_frame = invert_image(models, meta, rec["z0"], rec["image_negative.embeds"], pooled=False)
    max_abs, rms = diff(per_frame, rec["mixed_r1.0"])
    assert max_abs > 0.1 and rms > 0.01


def test_inverting_latents_directly_differs_from_the_reencoded_frames(models, meta, rec):
    direct = unfold_frames(rec["idm_latents"].to(DTYPE), 8)
    ours = invert_image(models, meta, direct, rec["image_negative.embeds"])
    max_abs, rms = diff(ours, rec["mixed_r1.0"])
    assert max_abs > 0.1 and rms > 0.01


def test_video_branch_inversion_matches(models, meta, rec):
    ours = invert_video(models, meta, rec["z0"], rec["video_negative.embeds"])
    assert diff(ours, rec["mixed_r0.0"])[0] < 1e-5


@pytest.mark.parametrize("r", [0.0, 0.5, 1.0])
def test_mix_is_linear_without_renormalisation(rec, r):
    mixed = r * rec["mixed_r1.0"].double() + (1 - r) * rec["mixed_r0.0"].double()
    assert diff(mixed, rec[f"mixed_r{r}"])[0] < 1e-6


def test_smoothing_matches(models, meta, rec):
    # r = 0.5 only: both branches feed it, and each smoothing run costs seconds in float64.
    ours = smooth(models, meta, rec["mixed_r0.5"].to(DTYPE), rec["video_prompt.embeds"], rec["video_negative.embeds"])
    assert diff(ours, rec["smoothed_r0.5"])[0] < 1e-3


@torch.no_grad()
def test_smoothed_latents_decode_to_the_recorded_video(models, rec):
    vae = models["vae"]
    pixels = vae.decode(fold_frames(rec["smoothed_r0.5"].to(DTYPE)) / vae.config.scaling_factor).sample
    assert diff(unfold_frames((pixels / 2 + 0.5).clamp(0, 1), 8), rec["video_r0.5"])[0] < 1e-5


@torch.no_grad()
def pooled_eps(unet, z, cond, num_frames: int | None) -> torch.Tensor:
    """One image-UNet call at t = 401 on folded frames; `num_frames` None means per-frame statistics."""
    cond = cond.expand(z.shape[0], -1, -1)
    if num_frames is None:
        return unet(z, 401, encoder_hidden_states=cond).sample
    with pool_group_norms_over_frames(unet, num_frames):
        return unet(z, 401, encoder_hidden_states=cond).sample


def test_pooling_follows_the_window(models, rec):
    """Windows of 4 frames pool over their own frames: the same as running each window on its own."""
    unet, z, cond = models["unet"], fold_frames(rec["z0"]), rec["image_negative.embeds"]
    windows = pooled_eps(unet, z, cond, 4)
    halves = torch.cat([pooled_eps(unet, z[:4], cond, 4), pooled_eps(unet, z[4:], cond, 4)])
    assert diff(windows, halves)[0] < 1e-10
    assert diff(windows, pooled_eps(unet, z, cond, 8))[0] > 1e-3


def test_hooks_are_removed_and_cover_the_resnet_and_output_norms(models):
    from bivdiff.pipelines.mixed_inversion import frame_pooled_norms

    unet = models["unet"]
    norms = frame_pooled_norms(unet)
    resnets = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert len(norms) == 2 * len(resnets) + 1 and norms[-1] is unet.conv_norm_out
    with pool_group_norms_over_frames(unet, 8):
        assert all(n._forward_pre_hooks and n._forward_hooks for n in norms)
    assert not any(n._forward_pre_hooks or n._forward_hooks for n in norms)
    with pytest.raises(ValueError, match="clips of 3"), pool_group_norms_over_frames(unet, 3), torch.no_grad():
        unet(torch.zeros(8, 4, 16, 16, dtype=DTYPE), 1, encoder_hidden_states=torch.zeros(8, 77, 32, dtype=DTYPE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooling_in_lower_precision_behind_offload_hooks(models, meta, rec, dtype):
    """Low-precision weights behind accelerate's offload hooks still pool: near the float64 pooled output, far from
    the per-frame one."""
    from accelerate import cpu_offload

    z, cond = fold_frames(rec["z0"]), rec["image_negative.embeds"]
    reference = pooled_eps(models["unet"], z, cond, 8)
    per_frame_gap = diff(pooled_eps(models["unet"], z, cond, None), reference)[0]
    unet = formula_weights_(UNet2DConditionModel(**meta["image_unet"])).to(dtype)
    cpu_offload(unet, execution_device="cpu")
    error = diff(pooled_eps(unet, z.to(dtype), cond.to(dtype), 8), reference)[0]
    assert error < (1e-5 if dtype == torch.float32 else per_frame_gap / 5)


# ---------------------------------------------------------------------------------------- through the public pipeline
class StopBeforeSmoothing(Exception):
    pass


@pytest.fixture(scope="module")
def pipe(models):
    from bivdiff import BIVDiffPipeline
    from bivdiff.tiny_models import sd15_scheduler_config

    pipe = BIVDiffPipeline(
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=models["tokenizer"],
        unet=models["unet"],
        video_unet=models["video_unet"],
        video_text_encoder=models["video_text_encoder"],
        video_tokenizer=models["tokenizer"],
        scheduler=DDIMScheduler(**sd15_scheduler_config()),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, meta, smooth: bool = False, **kwargs):
    """BIVDiffPipeline on the fixture's prompts and settings; returns (mixed noise, smoothed latents or None).
    Without `smooth` the call stops at smoothing's input, which keeps the float64 run short."""
    seen = {}
    smoothing = pipe.temporal_smoothing

    def spy(noise, *args, **kw):
        seen["noise"] = noise.clone()
        if not smooth:
            raise StopBeforeSmoothing
        return smoothing(noise, *args, **kw)

    pipe.temporal_smoothing = spy
    arguments = dict(
        prompt=meta["vdm_prompt"] + meta["pos_prompt"],
        negative_prompt=meta["negative_prompt"],
        num_inference_steps=meta["num_inference_steps"],
        guidance_scale=meta["guidance_scale"],
        output_type="latent",
    )
    try:
        out = pipe(**arguments | kwargs).frames
    except StopBeforeSmoothing:
        out = None
    finally:
        del pipe.temporal_smoothing
    return seen["noise"], out


def fixture_frames(rec) -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray(frame.numpy()) for frame in rec["idm_frames_u8"]]


def seeded(meta) -> torch.Generator:
    return torch.Generator().manual_seed(meta["vae_sample_seed"])


def test_pipeline_defaults_reproduce_the_original(pipe, meta, rec):
    """The 8-bit frames in, defaults: frame-pooled image inversion, mix, smoothing as the original's r = 0.5."""
    frames = fixture_frames(rec)
    noise, smoothed = run_pipeline(pipe, meta, True, video=frames, mixing_ratio=0.5, generator=seeded(meta))
    assert diff(noise, rec["mixed_r0.5"])[0] < 1e-5
    assert diff(smoothed, rec["smoothed_r0.5"])[0] < 1e-3


def test_pipeline_reencodes_image_model_latents_by_default(pipe, meta, rec):
    """The image model's latents in: decoded to 8-bit frames, encoded again with one seeded draw, then inverted."""
    latents = unfold_frames(rec["idm_latents"].to(DTYPE), 8)
    noise, _ = run_pipeline(pipe, meta, video_latents=latents, mixing_ratio=1.0, generator=seeded(meta))
    assert diff(noise, rec["mixed_r1.0"])[0] < 1e-5


def test_pipeline_without_generator_inverts_the_posterior_mean(pipe, models, meta, rec):
    noise, _ = run_pipeline(pipe, meta, video=fixture_frames(rec), mixing_ratio=1.0)
    expected = invert_image(models, meta, rec["z0_mean"], rec["image_negative.embeds"])
    assert diff(noise, expected)[0] < 1e-5


def test_switch_reencode_frames_off_inverts_the_latents_directly(pipe, models, meta, rec):
    latents = unfold_frames(rec["idm_latents"].to(DTYPE), 8)
    noise, _ = run_pipeline(
        pipe, meta, video_latents=latents, mixing_ratio=1.0, generator=seeded(meta), reencode_frames=False
    )
    assert diff(noise, invert_image(models, meta, latents, rec["image_negative.embeds"]))[0] < 1e-5
    assert diff(noise, rec["mixed_r1.0"])[0] > 0.1


def test_switch_pool_norms_over_frames_off_normalises_each_frame(pipe, models, meta, rec):
    noise, _ = run_pipeline(
        pipe, meta, video=fixture_frames(rec), mixing_ratio=1.0, generator=seeded(meta), pool_norms_over_frames=False
    )
    per_frame = invert_image(models, meta, rec["z0"], rec["image_negative.embeds"], pooled=False)
    assert diff(noise, per_frame)[0] < 1e-5
    assert diff(noise, rec["mixed_r1.0"])[0] > 0.1


def test_pipeline_pools_each_video_window_and_blends_them(pipe, rec):
    """With windows of 4 frames (no overlap) each window pools over its own frames in one UNet call."""
    z, cond = fold_frames(rec["z0"]), rec["image_negative.embeds"]
    pipe.enable_video_windows(4, 0)
    try:
        with count_calls(pipe.unet) as calls:
            ours = pipe.image_inversion_noise(z, 401, cond, frame_batch_size=1)
    finally:
        pipe.disable_video_windows()
    halves = torch.cat([pooled_eps(pipe.unet, z[:4], cond, 4), pooled_eps(pipe.unet, z[4:], cond, 4)])
    # 1e-6: windows are blended in float32, as the video branch blends them.
    assert diff(ours, halves)[0] < 1e-6 and calls == [4, 4]
    assert diff(ours, pooled_eps(pipe.unet, z, cond, 8))[0] > 1e-3


@contextlib.contextmanager
def count_calls(unet):
    sizes = []
    handle = unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        handle.remove()


def test_pooling_with_a_peft_lora_loaded(models, meta, rec):
    """A LoRA on the ResNet convolutions and attention leaves the hooked norms alone: the pipeline's pooled seam
    equals the reference pooled call on the same adapted UNet, and the adapter changes the result."""
    from peft import LoraConfig

    from bivdiff import BIVDiffPipeline

    unet = formula_weights_(UNet2DConditionModel(**meta["image_unet"]))
    z, cond = fold_frames(rec["z0"]).float(), rec["image_negative.embeds"].float()
    plain = pooled_eps(unet, z, cond, 8)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    components = {k: v for k, v in models.items() if k not in ("unet", "text_encoder")}
    pipe = BIVDiffPipeline(
        **components, unet=unet, video_tokenizer=models["tokenizer"], text_encoder=models["text_encoder"],
        scheduler=DDIMScheduler(),
    )
    with torch.no_grad():
        ours = pipe.image_inversion_noise(z, 401, cond, frame_batch_size=1)
    assert diff(ours, pooled_eps(unet, z, cond, 8))[0] < 1e-6
    assert diff(ours, plain)[0] > 1e-3
