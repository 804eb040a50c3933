"""Oracles for results a user would otherwise get wrong silently: what the inversions are conditioned on, the
warp error's occlusion handling, the local-blend threshold default, and inversion timesteps for every spacing."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from pipeline_helpers import bivdiff_components
from synthetic_videos import HEIGHT, NUM_FRAMES, STEP, WIDTH, texture

from bivdiff import BIVDiffDDIMInverseScheduler, BIVDiffPipeline
from bivdiff import evaluation
from bivdiff.evaluation import frame_difference, warp_error
from bivdiff.pipelines import prompt2prompt_control as p2p
from bivdiff.tiny_models import sd15_scheduler_config

STEPS, GUIDANCE, PROMPT = 3, 4.0, "a dog running"

# ---------------------------------------------------------------------------------------------------------------
# Inversion conditioning: a whole pipeline call against a plain loop written from DESIGN.md section 3
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    pipe = BIVDiffPipeline(**bivdiff_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embed(tokenizer, text_encoder, text: str) -> torch.Tensor:
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    return text_encoder(torch.tensor([ids]))[0]


def original_inversion(unet, z: torch.Tensor, cond: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The original's reverse step over t = 1, 1 + T/N, ...: eps at t, then to min(t + T/N, T - 2)."""
    ratio = 1000 // STEPS
    for t in range(1, 1000, ratio)[:STEPS]:
        eps = unet(z, t, encoder_hidden_states=cond.expand(z.shape[0], -1, -1)).sample
        x0 = (z - (1 - alphas[t]).sqrt() * eps) / alphas[t].sqrt()
        a_next = alphas[min(t + ratio, 998)]
        z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return z


def stock_ddim_smoothing(unet, z, positive, negative) -> torch.Tensor:
    """Stage 3 with diffusers' own DDIMScheduler: eta 0, classifier-free guidance."""
    scheduler = DDIMScheduler(**sd15_scheduler_config())
    scheduler.set_timesteps(STEPS)
    for t in scheduler.timesteps:
        uncond = unet(z, t, encoder_hidden_states=negative).sample
        cond = unet(z, t, encoder_hidden_states=positive).sample
        z = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, z).prev_sample
    return z


CONDITIONING = [
    # (negative_prompt, inversion_prompt, text the inversion must be conditioned on)
    ("blurry, static", None, "blurry, static"),
    (None, None, ""),
    ("blurry, static", "a cat", "a cat"),
]


@pytest.mark.parametrize("negative_prompt, inversion_prompt, inversion_text", CONDITIONING)
@torch.no_grad()
def test_video_branch_inverts_on_the_negative_prompt_or_the_inversion_prompt(
    pipe, negative_prompt, inversion_prompt, inversion_text
):
    frames = np.random.default_rng(0).random((3, 32, 32, 3)).astype(np.float32)
    out = pipe(
        video=frames,
        prompt=PROMPT,
        negative_prompt=negative_prompt,
        inversion_prompt=inversion_prompt,
        mixing_ratio=0.0,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        output_type="latent",
    ).frames

    z0 = pipe.vae.encode(torch.from_numpy(frames).permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
    z0 = (z0 * pipe.vae.config.scaling_factor).permute(1, 0, 2, 3)[None]
    video_text = lambda text: embed(pipe.video_tokenizer, pipe.video_text_encoder, text)  # noqa: E731
    noise = original_inversion(pipe.video_unet, z0, video_text(inversion_text), pipe.scheduler.alphas_cumprod)
    expected = stock_ddim_smoothing(pipe.video_unet, noise, video_text(PROMPT), video_text(negative_prompt or ""))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("negative_prompt, inversion_prompt, inversion_text", CONDITIONING)
@torch.no_grad()
def test_image_branch_inverts_on_the_negative_prompt_or_the_inversion_prompt(
    pipe, negative_prompt, inversion_prompt, inversion_text
):
    # One frame: frame-pooled and per-frame normalisation agree, so the plain 2D UNet is the oracle either way.
    frames = np.random.default_rng(1).random((1, 32, 32, 3)).astype(np.float32)
    out = pipe(
        video=frames,
        prompt=PROMPT,
        negative_prompt=negative_prompt,
        inversion_prompt=inversion_prompt,
        mixing_ratio=1.0,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        output_type="latent",
    ).frames

    z0 = pipe.vae.encode(torch.from_numpy(frames).permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
    z0 = z0 * pipe.vae.config.scaling_factor
    cond = embed(pipe.tokenizer, pipe.text_encoder, inversion_text)
    noise = original_inversion(pipe.unet, z0, cond, pipe.scheduler.alphas_cumprod)
    video_text = lambda text: embed(pipe.video_tokenizer, pipe.video_text_encoder, text)  # noqa: E731
    noise = noise.permute(1, 0, 2, 3)[None]
    expected = stock_ddim_smoothing(pipe.video_unet, noise, video_text(PROMPT), video_text(negative_prompt or ""))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_decoded_video_is_the_vae_decode_of_the_unscaled_latents(pipe):
    args = dict(video=np.random.default_rng(2).random((3, 32, 32, 3)).astype(np.float32), prompt=PROMPT)
    args.update(mixing_ratio=0.5, num_inference_steps=2, decode_chunk_size=2)
    latents = pipe(**args, output_type="latent").frames
    video = pipe(**args, output_type="pt").frames
    folded = latents[0].permute(1, 0, 2, 3) / pipe.vae.config.scaling_factor
    expected = (pipe.vae.decode(folded).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(video[0], expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_frames_are_resized_to_the_output_size_and_chunks_do_not_matter(pipe):
    frames = np.random.default_rng(3).random((5, 36, 44, 3)).astype(np.float32)
    args = dict(video=frames, prompt=PROMPT, mixing_ratio=0.5, num_inference_steps=2, output_type="latent")
    assert pipe(**args).frames.shape[-2:] == (16, 20)  # 36x44 rounds down to 32x40 pixels
    assert pipe(**args, height=24, width=32).frames.shape[-2:] == (12, 16)
    chunked, whole = pipe(**args, frame_batch_size=2).frames, pipe(**args, frame_batch_size=5).frames
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Warp error with an occluder
# ---------------------------------------------------------------------------------------------------------------


def occluder_clip(height=96, width=128, size=56, step=16):
    """Two frames: a static texture and a flat square that moves `step` px right, covering a strip of it."""
    background = texture(seed=0)[:height, :width] * 0.8
    frames = np.stack([background.copy(), background.copy()])
    for t in range(2):
        frames[t, 20 : 20 + size, 10 + step * t : 10 + step * t + size] = 0.9
    return frames


def test_warp_error_skips_occluded_pixels():
    source = occluder_clip()
    # The second frame is the first moved along the source's motion and brightened by 0.1 everywhere, so on every
    # pixel that stays visible the warp error is 0.1 by hand. Where the square covers the background (a 16 x 56
    # strip) the warped pixel is the square's, not the background's: counting those would give about 0.18.
    brighter = np.round((source + np.array([0.0, 0.1])[:, None, None, None]) * 255) / 255
    assert warp_error(brighter, source) == pytest.approx(0.1, abs=0.015)


def falling_video():
    """A window sliding STEP px up per frame over a texture: content moves STEP px down."""
    image = texture()
    top = NUM_FRAMES * STEP
    return np.stack([image[top - STEP * t : top - STEP * t + HEIGHT, 10 : 10 + WIDTH] for t in range(NUM_FRAMES)])


def test_warp_error_follows_vertical_motion_and_ignores_rows_that_leave():
    video = falling_video()
    assert warp_error(video) < 0.003  # each frame is its predecessor moved down; a wrong flow axis gives ~0.07
    leaving = video.copy()
    leaving[0, HEIGHT - STEP :] = 1.0 - leaving[0, HEIGHT - STEP :]  # frame 0's bottom rows have no successor
    assert warp_error(leaving, source=video) == pytest.approx(warp_error(video, source=video), abs=2e-4)


def test_warp_error_sees_the_motion_of_saturated_content():
    # A pure white square moving 4 px right on black: the flow must see white as white (255, not wrapped to 0).
    video = np.zeros((4, 64, 96, 3), np.float32)
    for t in range(4):
        video[t, 16:40, 10 + 4 * t : 34 + 4 * t] = 1.0
    assert frame_difference(video) == pytest.approx(2 * 4 * 24 / (64 * 96))  # two 4 x 24 strips change per pair
    assert warp_error(video) < 0.001


@pytest.mark.parametrize("backward_x, consistent", [(-18.0, True), (-16.0, False)])
def test_occlusion_tolerance_grows_with_the_flow(backward_x, consistent):
    # Ruder et al.: |f + b|^2 < 0.01 (|f|^2 + |b|^2) + 0.5. With f = 20 px: b = -18 gives 4 < 7.74, b = -16 gives
    # 16 > 7.06; a fixed tolerance of 0.5 would call both occluded.
    forward = np.zeros((4, 64, 2), np.float32)
    forward[..., 0] = 20.0
    backward = np.zeros_like(forward)
    backward[..., 0] = backward_x
    assert evaluation._consistent(forward, backward)[:, :40].all() == consistent


@pytest.mark.parametrize("metric", [warp_error, frame_difference])
def test_a_one_frame_error_names_the_metric(metric):
    with pytest.raises(ValueError, match=f"^{metric.__name__} compares consecutive frames"):
        metric(np.zeros((1, 8, 8, 3), np.float32))


# ---------------------------------------------------------------------------------------------------------------
# Local blend: the default threshold on a mask that is neither empty nor full
# ---------------------------------------------------------------------------------------------------------------


def hand_placed_blend(blend: p2p.LocalBlend) -> p2p.LocalBlend:
    """Blend-word attention peaks of 1.0, 0.4 and 0.25 (of the maximum) on a 6x8 map, 3 cells apart."""
    blend.word_alphas = torch.zeros(2, 5)
    blend.word_alphas[:, 2] = 1
    maps = torch.zeros(1, 2, 6 * 8, 5)
    for row, col, value in ((1, 1, 1.0), (1, 5, 0.4), (4, 3, 0.25)):
        maps[0, :, row * 8 + col, 2] = value
    blend.accumulate(p2p.AttentionLayer("up_blocks.1.attn2", "up", 4), maps)
    return blend


@pytest.mark.parametrize(
    "make",
    [
        lambda: p2p.LocalBlend("car"),
        lambda: p2p.make_controller(p2p_tokenizer(), "a car", "a bus", "refine", 4, local_blend_words="a").local_blend,
    ],
    ids=["LocalBlend", "make_controller"],
)
def test_local_blend_default_threshold_is_the_originals(make):
    blend = hand_placed_blend(make())
    expected = torch.zeros(6, 8)
    expected[0:3, 0:3] = 1  # the 1.0 peak, 3x3 max-pooled
    expected[0:3, 4:7] = 1  # 0.4 > 0.3 is kept; the 0.25 peak at (4, 3) is not
    expected = expected.repeat_interleave(4, 0).repeat_interleave(4, 1)
    latents = torch.randn(2, 4, 24, 32, generator=torch.Generator().manual_seed(0))
    blended = blend(latents)
    assert torch.equal(blend.last_mask[0, 0], expected)
    keep = expected == 0
    assert keep.any() and (~keep).any()
    torch.testing.assert_close(blended[1][:, keep], latents[0][:, keep], atol=0, rtol=0)
    torch.testing.assert_close(blended[1][:, ~keep], latents[1][:, ~keep], atol=1e-6, rtol=0)
    assert torch.equal(blended[0], latents[0])


def p2p_tokenizer():
    from bivdiff.tiny_models import tiny_tokenizer

    return tiny_tokenizer()


def test_prompt2prompt_pipeline_default_threshold_is_the_originals():
    import inspect

    from bivdiff import BIVDiffPrompt2PromptPipeline

    signature = inspect.signature(BIVDiffPrompt2PromptPipeline.__call__)
    assert signature.parameters["local_blend_threshold"].default == 0.3


# ---------------------------------------------------------------------------------------------------------------
# Inversion timesteps for every spacing
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 7, 50, 217, 999, 1000])
def test_every_inversion_step_moves_to_a_noisier_existing_level(spacing, num_steps):
    scheduler = BIVDiffDDIMInverseScheduler(**{**sd15_scheduler_config(), "timestep_spacing": spacing})
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.tolist()
    assert timesteps == sorted(set(timesteps)) and 0 <= timesteps[0]
    alphas = scheduler.alphas_cumprod.double()
    z = torch.ones(1, 4, 2, 2)
    for t in timesteps:
        target = scheduler.next_timestep(t)
        assert t < target <= 999
        # eps = 0 scales z by sqrt(a_next / a_t): after the chain, sqrt(a_target / a_first) if each step starts
        # where the one before ended.
        z = scheduler.step(torch.zeros_like(z), t, z).prev_sample
        expected = (alphas[target] / alphas[timesteps[0]]).sqrt().float()
        torch.testing.assert_close(z, torch.full_like(z, expected.item()), rtol=1e-3, atol=0)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_trailing_and_linspace_inversion_ends_where_ddim_starts(spacing):
    """Spacings whose denoising starts at T - 1 invert up to T - 1 through DDIM's own levels."""
    config = {**sd15_scheduler_config(), "timestep_spacing": spacing}
    inverse, ddim = BIVDiffDDIMInverseScheduler(**config), DDIMScheduler(**config)
    inverse.set_timesteps(50)
    ddim.set_timesteps(50)
    levels = inverse.timesteps.tolist() + [inverse.next_timestep(inverse.timesteps[-1])]
    assert levels[-1] == ddim.timesteps[0] == 999
    if spacing == "trailing":
        assert levels == [0] + ddim.timesteps.flip(0).tolist()


# ---------------------------------------------------------------------------------------------------------------
# per-frame generators and the smoothing sampler's rule
# ---------------------------------------------------------------------------------------------------------------


def draws(generators) -> list[float]:
    """One number from each generator: generators are equal here when they draw equal numbers."""
    return [torch.rand(1, generator=g).item() for g in generators]


@pytest.mark.parametrize("num_videos, num_frames", [(1, 3), (2, 3), (3, 1)])
def test_frame_generators_follow_the_documented_derivation(num_videos, num_frames):
    from bivdiff.pipelines.mixed_inversion import derive_generators, video_frame_generators

    # One generator: B * F seeds drawn from it, video after video.
    derived = video_frame_generators(torch.Generator().manual_seed(5), num_videos, num_frames)
    flat = draws(derive_generators(torch.Generator().manual_seed(5), num_videos * num_frames))
    assert [len(video) for video in derived] == [num_frames] * num_videos
    assert [x for video in derived for x in draws(video)] == flat
    seeds = torch.randint(0, 2**62, (num_videos * num_frames,), generator=torch.Generator().manual_seed(5)).tolist()
    assert flat == [torch.rand(1, generator=torch.Generator().manual_seed(s)).item() for s in seeds]

    # One generator per video: each video's frames derived from its own.
    per_video = video_frame_generators([torch.Generator().manual_seed(10 + b) for b in range(num_videos)],
                                       num_videos, num_frames)
    assert [draws(video) for video in per_video] == [
        draws(derive_generators(torch.Generator().manual_seed(10 + b), num_frames)) for b in range(num_videos)
    ]

    # Per video and frame: used as given.
    given = [[torch.Generator().manual_seed(100 * b + f) for f in range(num_frames)] for b in range(num_videos)]
    assert all(a is b for got, want in zip(video_frame_generators(given, num_videos, num_frames), given)
               for a, b in zip(got, want))
    assert video_frame_generators(None, num_videos, num_frames) is None


def test_smoothing_sampler_keeps_an_explicit_final_alpha_and_defaults_to_sds():
    from diffusers import PNDMScheduler

    from bivdiff.pipelines.mixed_inversion import ddim_sampler

    config = sd15_scheduler_config()
    # Chosen by the config: kept either way.
    for value in (True, False):
        assert ddim_sampler(DDIMScheduler(**{**config, "set_alpha_to_one": value})).config.set_alpha_to_one is value
    # Missing from a loaded config: DDIM's class default (True) is not a choice, SD's False applies.
    loaded = DDIMScheduler.from_config({k: v for k, v in config.items() if k != "set_alpha_to_one"})
    assert loaded.config.set_alpha_to_one is True and "set_alpha_to_one" in loaded.config._use_default_values
    assert ddim_sampler(loaded).config.set_alpha_to_one is False
    # Another sampler's config without the key: False, and never DDIM's sample clipping.
    pndm = ddim_sampler(PNDMScheduler.from_config({k: v for k, v in config.items() if k != "set_alpha_to_one"}))
    assert pndm.config.set_alpha_to_one is False and pndm.config.clip_sample is False


def test_warp_samples_bilinearly_and_marks_the_points_inside_the_frame():
    """Oracle: on a linear ramp image bilinear sampling is exact, so frame t+1 sampled at x + flow is the ramp's
    value there; points farther out than the frame's edges are marked outside and sampled as 0."""
    height, width = 6, 8
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = (xs + 10 * ys)[..., None].repeat(3, axis=2) / 100.0
    for dx, dy in ((2.0, -1.0), (-2.0, 3.0), (2.5, -1.5)):
        flow = np.zeros((height, width, 2), np.float32)
        flow[..., 0], flow[..., 1] = dx, dy
        warped, inside = evaluation._warp(image, flow)
        expected_inside = (xs + dx >= 0) & (xs + dx <= width - 1) & (ys + dy >= 0) & (ys + dy <= height - 1)
        assert np.array_equal(inside, expected_inside), (dx, dy)
        np.testing.assert_allclose(warped[inside][:, 0], ((xs + dx + 10 * (ys + dy)) / 100.0)[inside], atol=1e-5)
        far = (xs + dx < -1) | (xs + dx > width) | (ys + dy < -1) | (ys + dy > height)
        assert np.all(warped[far] == 0), (dx, dy)
