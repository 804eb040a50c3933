"""Stages 2 and 3 against hand-written oracles, on tiny random models."""

import contextlib

import pytest
import torch
from pipeline_helpers import bivdiff_components, count_forward_calls

from bivdiff import BIVDiffPipeline
from bivdiff.pipelines.mixed_inversion import pool_group_norms_over_frames


@pytest.fixture(scope="module")
def pipe():
    pipe = BIVDiffPipeline(**bivdiff_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def clean_latents():
    return torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def reference_inversion(unet, z, cond, alphas, num_steps, fold, kept_steps=None):
    """A plain loop of the original reverse step (UNet at t, next level min(t + T/N, T - 2)); `kept_steps`: only the
    first ones (a strength below 1)."""
    ratio = 1000 // num_steps
    for t in range(1, 1000, ratio)[:num_steps][:kept_steps]:
        x = z
        if fold:
            b, c, f, h, w = z.shape
            x = z.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        eps = unet(x, t, encoder_hidden_states=cond.expand(x.shape[0], -1, -1)).sample
        if fold:
            eps = eps.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
        a_t, a_next = alphas[t], alphas[min(t + ratio, 998)]
        x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return z


def reference_smoothing(unet, z, cond, uncond, alphas, num_steps, guidance, kept_steps=None):
    """Plain DDIM (eta 0) with classifier-free guidance, leading spacing, offset 1, final alpha = alphas[0];
    `kept_steps`: only the last ones (a strength below 1)."""
    ratio = 1000 // num_steps
    for t in reversed(range(1, 1000, ratio)[:num_steps][:kept_steps]):
        eps_u = unet(z, t, encoder_hidden_states=uncond).sample
        eps_c = unet(z, t, encoder_hidden_states=cond).sample
        eps = eps_u + guidance * (eps_c - eps_u)
        a_t = alphas[t]
        a_prev = alphas[t - ratio] if t - ratio >= 0 else alphas[0]
        x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return z


# strength -> the steps it keeps of 5 (inversion: the first ones; smoothing: the last ones)
STRENGTHS = [(1.0, 5), (0.6, 3), (0.2, 1)]


@pytest.mark.parametrize("strength, kept", STRENGTHS)
@pytest.mark.parametrize("pooled", [True, False])
@torch.no_grad()
def test_image_branch_equals_reference_loop_with_frames_in_batch(pipe, clean_latents, pooled, strength, kept):
    """Pooled: the clip's frames share ResNet statistics (the original's inflated UNet); else each frame alone."""
    cond = pipe.encode_prompt("", "cpu")[0]
    ours = pipe.invert_image_branch(clean_latents, cond, 5, frame_batch_size=2, pooled=pooled, strength=strength)
    alphas = pipe.scheduler.alphas_cumprod
    with pool_group_norms_over_frames(pipe.unet, 3) if pooled else contextlib.nullcontext():
        expected = reference_inversion(pipe.unet, clean_latents, cond, alphas, 5, fold=True, kept_steps=kept)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    other = reference_inversion(pipe.unet, clean_latents, cond, alphas, 5, True, kept) if pooled else None
    assert other is None or (ours - other).abs().max() > 1e-3


@pytest.mark.parametrize("strength, kept", STRENGTHS)
@torch.no_grad()
def test_video_branch_equals_reference_loop_on_whole_clip(pipe, clean_latents, strength, kept):
    cond = pipe.encode_video_prompt("", "cpu")[0]
    ours = pipe.invert_video_branch(clean_latents, cond, num_steps=5, strength=strength)
    alphas = pipe.scheduler.alphas_cumprod
    expected = reference_inversion(pipe.video_unet, clean_latents, cond, alphas, 5, fold=False, kept_steps=kept)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strength, kept", STRENGTHS)
@torch.no_grad()
def test_smoothing_equals_reference_ddim_cfg_loop(pipe, clean_latents, strength, kept):
    pos, neg = pipe.encode_video_prompt("a cat", "cpu", negative_prompt="blurry")
    ours = pipe.temporal_smoothing(clean_latents, pos, neg, num_inference_steps=5, guidance_scale=5.0,
                                   strength=strength)
    alphas = pipe.scheduler.alphas_cumprod
    expected = reference_smoothing(pipe.video_unet, clean_latents, pos, neg, alphas, 5, 5.0, kept_steps=kept)
    # fp32 rounding of one batched CFG call against the loop's, relative to latents of magnitude ~3
    torch.testing.assert_close(ours, expected, atol=5e-5, rtol=1e-5)


@torch.no_grad()
def test_smoothing_runs_cfg_as_one_batched_call(pipe, clean_latents):
    pos, neg = pipe.encode_video_prompt("a cat", "cpu")
    with count_forward_calls(video_unet=pipe.video_unet) as calls:
        pipe.temporal_smoothing(clean_latents, pos, neg, num_inference_steps=4, guidance_scale=7.5)
    assert calls["video_unet"] == 4


@pytest.mark.parametrize(
    "ratio, pooled, image_calls, video_calls",
    [(0.0, True, 0, 4), (0.5, False, 8, 4), (1.0, False, 8, 0), (1.0, True, 4, 0)],
)
@torch.no_grad()
def test_branches_run_only_when_weighted(pipe, clean_latents, ratio, pooled, image_calls, video_calls):
    img = pipe.encode_prompt("", "cpu")[0]
    vid = pipe.encode_video_prompt("", "cpu")[0]
    with count_forward_calls(unet=pipe.unet, video_unet=pipe.video_unet) as calls:
        pipe.mixed_inversion(clean_latents, ratio, 4, 2, img, vid, pool_norms_over_frames=pooled)
    # Per frame: 3 frames in chunks of 2 -> 2 image-UNet calls per step; pooled: the clip in one call.
    assert calls == {"unet": image_calls, "video_unet": video_calls}


@torch.no_grad()
def test_mix_is_linear_without_renormalisation(pipe, clean_latents):
    img = pipe.encode_prompt("", "cpu")[0]
    vid = pipe.encode_video_prompt("", "cpu")[0]
    z_img = pipe.invert_image_branch(clean_latents, img, 3, 8)
    z_vid = pipe.invert_video_branch(clean_latents, vid, 3)
    mixed = pipe.mixed_inversion(clean_latents, 0.3, 3, 8, img, vid)
    torch.testing.assert_close(mixed, 0.3 * z_img + 0.7 * z_vid, atol=1e-6, rtol=0)


@torch.no_grad()
def test_invert_then_denoise_reconstructs_and_error_shrinks_with_steps(clean_latents):
    pipe = BIVDiffPipeline(**bivdiff_components())
    pipe.set_progress_bar_config(disable=True)
    # A gentler random UNet keeps the noise prediction in the range a trained model has.
    pipe.video_unet.conv_out.weight.mul_(0.1)
    pipe.video_unet.conv_out.bias.mul_(0.1)
    neg = pipe.encode_video_prompt("", "cpu")[0]
    errors = []
    for steps in (10, 25, 50, 100):
        noise = pipe.invert_video_branch(clean_latents, neg, steps)
        rebuilt = pipe.temporal_smoothing(noise, neg, neg, steps, guidance_scale=1.0)
        errors.append((rebuilt - clean_latents).abs().mean().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05 and errors[-1] < errors[0] / 5, errors


@torch.no_grad()
def test_vae_encoding_uses_posterior_mean_without_generator_one_sample_with_one(pipe):
    frames = torch.rand(3, 3, 32, 32)
    a = pipe.encode_frames(pipe.source_pixels(frames, 32, 32), chunk_size=2)
    b = pipe.encode_frames(pipe.source_pixels(frames, 32, 32), chunk_size=3)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    expected = pipe.vae.encode(frames * 2 - 1).latent_dist.mode() * pipe.vae.config.scaling_factor
    torch.testing.assert_close(a[0].permute(1, 0, 2, 3), expected, atol=1e-5, rtol=0)
    # With a generator: one draw for all frames (as the original's latent_dist.sample()), whatever the chunking.
    sampled = pipe.encode_frames(pipe.source_pixels(frames, 32, 32), 2, torch.Generator().manual_seed(3))
    dist = pipe.vae.encode(frames * 2 - 1).latent_dist
    one_draw = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sampled[0].permute(1, 0, 2, 3), one_draw * 0.18215, atol=1e-5, rtol=0)


def test_smoothing_never_clips_latents_whatever_the_stage1_sampler():
    from diffusers import EulerAncestralDiscreteScheduler

    from bivdiff.tiny_models import sd15_scheduler_config

    config = {k: v for k, v in sd15_scheduler_config().items() if k not in ("clip_sample", "set_alpha_to_one")}
    pipe = BIVDiffPipeline(**bivdiff_components(scheduler=EulerAncestralDiscreteScheduler(**config)))
    smoothing = pipe.smoothing_scheduler()
    assert smoothing.config.clip_sample is False and smoothing.config.set_alpha_to_one is False
    assert smoothing.config.steps_offset == 1
    torch.testing.assert_close(smoothing.alphas_cumprod, pipe.inverse_scheduler.alphas_cumprod)


def test_fold_and_unfold_keep_each_video_and_frame_in_place():
    from bivdiff.pipelines.mixed_inversion import fold_frames, unfold_frames

    videos = torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    folded = fold_frames(videos)
    assert folded.shape == (6, 4, 5, 6)
    for i in range(6):
        assert folded[i].equal(videos[i // 3, :, i % 3])
    assert unfold_frames(folded, 3).equal(videos)


@torch.no_grad()
def test_decoding_divides_by_the_scaling_factor_in_chunks(pipe):
    latents = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = pipe.decode_latents(latents, chunk_size=2)
    for b in range(2):
        for f in range(3):
            expected = pipe.vae.decode(latents[b : b + 1, :, f] / pipe.vae.config.scaling_factor).sample[0]
            torch.testing.assert_close(ours[b, :, f], expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_inversion_state_stays_fp32_between_steps_with_a_half_precision_unet():
    pipe = BIVDiffPipeline(**bivdiff_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.to(torch.bfloat16)
    pipe.video_unet.to(torch.bfloat16)
    seen = []
    step = pipe.inverse_scheduler.step
    pipe.inverse_scheduler.step = lambda eps, t, z, **kw: seen.append(z.dtype) or step(eps, t, z, **kw)
    latents = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(1, 77, 32, dtype=torch.bfloat16)
    image = pipe.invert_image_branch(latents, cond, 3, 8)
    video = pipe.invert_video_branch(latents, torch.zeros(1, 77, 24), 3)
    assert seen and set(seen) == {torch.float32}
    assert image.dtype == video.dtype == torch.float32


@torch.no_grad()
def test_image_inversion_runs_one_clip_per_seam_call(pipe):
    latents = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    shapes = []
    seam = pipe.image_inversion_noise
    pipe.image_inversion_noise = lambda frames, *a: shapes.append(tuple(frames.shape)) or seam(frames, *a)
    try:
        pipe.invert_image_branch(latents, pipe.encode_prompt(["", ""], "cpu")[0], 2, 8)
    finally:
        del pipe.image_inversion_noise
    assert shapes == [(3, 4, 8, 8)] * 4


@torch.no_grad()
def test_smoothing_without_guidance_is_the_plain_ddim_loop_on_one_batch(pipe, clean_latents):
    """guidance_scale 1 means no CFG: one video-UNet batch per step (not two), the conditional prediction alone,
    and `num_timesteps` set for step callbacks."""
    cond = pipe.encode_video_prompt("a cat", "cpu")[0]
    neg = pipe.encode_video_prompt("", "cpu")[0]
    batches = []

    def record(module, args, kwargs):
        batches.append((args[0] if args else kwargs["sample"]).shape[0])

    hook = pipe.video_unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = pipe.temporal_smoothing(clean_latents, cond, neg, 3, guidance_scale=1.0)
    finally:
        hook.remove()
    assert batches == [1, 1, 1] and pipe.num_timesteps == 3
    scheduler = pipe.smoothing_scheduler()
    scheduler.set_timesteps(3)
    z = clean_latents
    for t in scheduler.timesteps:
        z = scheduler.step(pipe.video_unet(z, t, encoder_hidden_states=cond).sample, t, z, eta=0.0).prev_sample
    torch.testing.assert_close(out, z, atol=1e-6, rtol=0)


@torch.no_grad()
def test_reencoding_a_batch_of_videos_reencodes_each_video(pipe):
    from types import SimpleNamespace

    call = SimpleNamespace(decode_chunk_size=2, generator=None)
    latents = torch.randn(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    both = pipe.reencode_latents(latents, call)
    singles = torch.cat([pipe.reencode_latents(latents[i : i + 1], call) for i in range(2)])
    torch.testing.assert_close(both, singles, atol=1e-5, rtol=0)
    assert not torch.allclose(both[0], both[1], atol=1e-2)


@torch.no_grad()
def test_step_callback_sees_every_step_and_may_replace_latents_and_embeddings(pipe):
    """Oracle: the CFG DDIM loop written out, with the embeddings the callback swaps in after the first step;
    three videos, so the guidance halves are split by batch, not by count."""
    generator = torch.Generator().manual_seed(6)
    noise = torch.randn(3, 4, 3, 8, 8, generator=generator)
    cond = pipe.encode_video_prompt(["a cat", "a dog", "a car"], "cpu")[0]
    neg = pipe.encode_video_prompt(["", "", ""], "cpu")[0]
    inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((pipeline is pipe, step, int(timestep), sorted(tensors), tensors["latents"]))
        if step == 0:  # guide away from the prompts from here on
            return {"prompt_embeds": tensors["negative_prompt_embeds"], "negative_prompt_embeds": cond}
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 2 else {}

    out = pipe.temporal_smoothing(noise, cond, neg, 3, 5.0, callback, inputs)
    scheduler = pipe.smoothing_scheduler()
    scheduler.set_timesteps(3)
    timesteps = scheduler.timesteps.tolist()
    assert [entry[:4] for entry in seen] == [(True, i, t, sorted(inputs)) for i, t in enumerate(timesteps)]
    assert torch.count_nonzero(out) == 0  # the last step's replacement is what comes out
    z = noise
    for i, t in enumerate(timesteps):
        positive, negative = (cond, neg) if i == 0 else (neg, cond)
        both = pipe.video_unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([negative, positive])).sample
        uncond, text = both.chunk(2)
        z = scheduler.step(uncond + 5.0 * (text - uncond), t, z, eta=0.0).prev_sample
        torch.testing.assert_close(seen[i][4], z, atol=1e-5, rtol=0)


@torch.no_grad()
def test_one_source_clip_encodes_into_each_videos_own_posterior_draw(pipe):
    """Oracle: the VAE posterior of the clip, sampled with each video's generator (its mean without one)."""
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    seeds = (1, 2)
    both = pipe.encode_frames(pixels, 2, [torch.Generator().manual_seed(s) for s in seeds], num_videos=2)
    assert both.shape == (2, 4, 3, 16, 16)
    dist = pipe.vae.encode(pipe.video_processor.normalize(pixels)).latent_dist
    for video, seed in zip(both, seeds):
        expected = dist.sample(generator=torch.Generator().manual_seed(seed)) * pipe.vae.config.scaling_factor
        torch.testing.assert_close(video, expected.permute(1, 0, 2, 3), atol=1e-5, rtol=0)
    means = pipe.encode_frames(pixels, 2, None, num_videos=2)
    for video in means:
        torch.testing.assert_close(video, (dist.mode() * pipe.vae.config.scaling_factor).permute(1, 0, 2, 3))


class MarkerProcessor:
    """diffusers' default attention, recording the `marker` cross-attention keyword each call receives."""

    def __init__(self, seen: list):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.seen, self.inner = seen, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, marker=None):
        self.seen.append(marker)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@torch.no_grad()
def test_image_inversion_passes_the_calls_cross_attention_kwargs(clean_latents):
    pipe = BIVDiffPipeline(**bivdiff_components())
    seen = []
    pipe.unet.set_attn_processor(MarkerProcessor(seen))
    frames = clean_latents[0].permute(1, 0, 2, 3)
    cond = pipe.encode_prompt("", "cpu")[0]
    plain = pipe.image_inversion_noise(frames, 1, cond, 8)
    pipe._cross_attention_kwargs = {"marker": "lora scale and the like"}
    marked = pipe.image_inversion_noise(frames, 1, cond, 8)
    half = len(seen) // 2
    assert half and set(seen[:half]) == {None} and set(seen[half:]) == {"lora scale and the like"}
    torch.testing.assert_close(marked, plain, atol=0, rtol=0)
