"""BIVDiffInpaintPipeline: masks, stage 1 against the stock pipeline, paste-back, outputs, save/load, errors."""


import numpy as np
import PIL.Image
import pytest
import torch
from bivdiff.pipelines.pipeline_bivdiff_inpaint import feather_mask, mask_frames, outpaint_mask
from diffusers import StableDiffusionInpaintPipeline
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

from bivdiff import BIVDiffInpaintPipeline
from bivdiff.tiny_models import tiny_unet



def make_pipe(**overrides):
    components = bivdiff_components(unet=tiny_unet(in_channels=9), inversion_unet=tiny_unet(in_channels=4, seed=1))
    components.update(overrides)
    pipe = BIVDiffInpaintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mask_video(num_frames=NUM_FRAMES, size=HEIGHT) -> np.ndarray:
    """A moving white square per frame, float in [0, 1]."""
    masks = np.zeros((num_frames, size, size), dtype=np.float32)
    for i in range(num_frames):
        masks[i, 8 + 2 * i : 20 + 2 * i, 6 : 18 + i] = 1.0
    return masks


def inputs(**overrides):
    args = dict(
        video=control_video(),
        mask=mask_video(),
        num_inference_steps=2,
        generator=generators(),
        output_type="np",
    )
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


# ---------------------------------------------------------------------- masks
def test_outpaint_masks_have_the_original_band_geometry():
    rows = np.array([1.0] * 7 + [0.0] * 14 + [1.0] * 9, dtype=np.float32)  # H = 30: H//4 = 7, H//4*3 = 21
    np.testing.assert_array_equal(outpaint_mask(30, 40, "horizontal"), np.repeat(rows[:, None], 40, axis=1))
    cols = np.array([1.0] * 10 + [0.0] * 20 + [1.0] * 10, dtype=np.float32)  # W = 40: W//4 = 10, W//4*3 = 30
    np.testing.assert_array_equal(outpaint_mask(30, 40, "vertical"), np.repeat(cols[None, :], 30, axis=0))
    assert outpaint_mask(30, 40, "vertical").dtype == np.float32


def test_outpaint_margins_in_pixels():
    expected = np.zeros((8, 10), dtype=np.float32)
    expected[:1] = expected[6:] = 1.0  # top 1, bottom 2
    expected[:, :3] = expected[:, 6:] = 1.0  # left 3, right 4
    np.testing.assert_array_equal(outpaint_mask(8, 10, (1, 2, 3, 4)), expected)
    np.testing.assert_array_equal(outpaint_mask(8, 10, {"top": 1, "bottom": 2, "left": 3, "right": 4}), expected)
    only_right = np.zeros((8, 10), dtype=np.float32)
    only_right[:, 7:] = 1.0
    np.testing.assert_array_equal(outpaint_mask(8, 10, {"right": 3}), only_right)


@pytest.mark.parametrize(
    "outpaint, message",
    [
        ("diagonal", "Unknown `outpaint`"),
        ((1, 2, 3), "must be 'horizontal'"),
        ((-1, 0, 0, 0), "non-negative integers"),
        ((1.5, 0, 0, 0), "non-negative integers"),
        ((4, 4, 0, 0), "nothing of the 8x10 frame"),
        ((0, 0, 0, 0), "nothing to regenerate"),
        ({"up": 2}, "Unknown `outpaint` margin"),
    ],
)
def test_bad_outpaint_specs_are_named(outpaint, message):
    with pytest.raises(ValueError, match=message):
        outpaint_mask(8, 10, outpaint)


def test_masks_binarise_at_one_half_as_the_stock_pipeline_reads_them(pipe):
    levels = np.array([0, 126, 127, 128, 129, 255], dtype=np.uint8)
    grey = np.tile(levels.repeat(2)[None, :], (12, 1))  # (12, 12)
    expected = (grey >= 128).astype(np.float32)  # 127/255 < 0.5 <= 128/255
    stock = StableDiffusionInpaintPipeline(
        **{k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).mask_processor
    as_pil = PIL.Image.fromarray(grey)
    np.testing.assert_array_equal(stock.preprocess(as_pil, 12, 12)[0, 0].numpy(), expected)
    for mask in (as_pil, grey, grey / 255.0, torch.from_numpy(grey), [as_pil] * 2, np.stack([grey] * 2)):
        read = pipe.binary_masks(mask_frames(mask, 2), 12, 12)
        assert read.shape == (2, 1, 12, 12)
        np.testing.assert_array_equal(read[:, 0].numpy(), np.stack([expected] * 2))


def test_mask_forms_give_one_mask_per_frame(pipe):
    masks = mask_video()
    expected = torch.from_numpy(masks)[:, None]
    forms = [
        masks,
        torch.from_numpy(masks),
        torch.from_numpy(masks)[:, None],  # (F, 1, H, W)
        (masks * 255).astype(np.uint8),
        masks[..., None].repeat(3, axis=-1),  # (F, H, W, 3)
        [PIL.Image.fromarray((m * 255).astype(np.uint8)) for m in masks],
        [torch.from_numpy(m) for m in masks],
    ]
    for form in forms:
        torch.testing.assert_close(pipe.binary_masks(mask_frames(form, NUM_FRAMES), HEIGHT, WIDTH), expected)
    single = pipe.binary_masks(mask_frames(masks[1], NUM_FRAMES), HEIGHT, WIDTH)
    torch.testing.assert_close(single, expected[1:2].expand(NUM_FRAMES, -1, -1, -1))


def test_feathered_weights_ramp_outside_the_mask_only():
    mask = torch.zeros(1, 1, 1, 12)
    mask[..., 4:6] = 1.0
    weights = feather_mask(mask, 2)[0, 0, 0].tolist()
    assert weights == pytest.approx([0, 0, 1 / 3, 2 / 3, 1, 1, 2 / 3, 1 / 3, 0, 0, 0, 0])
    assert weights[:2] == [0, 0] and weights[8:] == [0, 0, 0, 0]  # exactly zero beyond the ramp
    assert feather_mask(mask, 0).equal(mask)


# ---------------------------------------------------------------------- stage 1
@torch.no_grad()
@pytest.mark.parametrize("frame_batch_size", [1, 2, 8])
def test_batched_stage1_equals_stock_pipeline_per_frame(pipe, frame_batch_size):
    frames, masks = control_video(), mask_video() * 0.4 + 0.3  # soft masks: 0.3 keeps, 0.7 regenerates
    ours = stage1(
        pipe, video=frames, mask=masks, prompt="", negative_prompt="ugly", num_inference_steps=3,
        frame_batch_size=frame_batch_size, generator=generators(),
    )  # fmt: skip
    stock = StableDiffusionInpaintPipeline(
        **{k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    stock.set_progress_bar_config(disable=True)
    assert ours.shape == (1, 4, NUM_FRAMES, HEIGHT // 2, WIDTH // 2)
    for i in range(NUM_FRAMES):
        expected = stock(
            "",
            image=frames[i : i + 1],
            mask_image=(masks[i : i + 1] >= 0.5).astype(np.float32),
            negative_prompt="ugly",
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(i),
            output_type="latent",
        ).images
        assert (ours[0, :, i] - expected[0]).abs().max().item() <= 1e-4


def test_outpainting_runs_the_stock_pipeline_on_the_band_mask(pipe):
    out = pipe(**inputs(mask=None, outpaint="vertical", output_type="latent"))
    band = np.stack([outpaint_mask(HEIGHT, WIDTH, "vertical")] * NUM_FRAMES)
    idm = stage1(pipe, **{k: v for k, v in inputs(mask=band).items() if k != "output_type"})
    torch.testing.assert_close(out.idm_frames, idm, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- paste-back
def test_paste_back_keeps_the_known_region_exactly(pipe):
    feather = 2
    plain = pipe(**inputs(mask=None, outpaint="horizontal")).frames[0]
    pasted = pipe(**inputs(mask=None, outpaint="horizontal", paste_back=True, paste_back_feather=feather)).frames[0]
    source = control_video()
    # Bands: rows [0, 8) and [24, 32); the ramp covers `feather` rows beyond each band.
    known = slice(8 + feather, 24 - feather)
    assert np.abs(plain[:, known] - source[:, known]).max() > 1e-2  # the video model redrew the known region
    np.testing.assert_array_equal(pasted[:, known], source[:, known])
    np.testing.assert_array_equal(pasted[:, :8], plain[:, :8])
    np.testing.assert_array_equal(pasted[:, 24:], plain[:, 24:])
    ramp = pasted[:, 8 + feather - 1]
    assert np.abs(ramp - source[:, 8 + feather - 1]).max() > 0


def test_paste_back_with_a_mask_video_and_every_pixel_output(pipe):
    masks = mask_video()
    outs = {
        t: pipe(**inputs(paste_back=True, paste_back_feather=0, output_type=t)).frames for t in ("np", "pt", "pil")
    }
    source = control_video()
    keep = masks == 0
    np.testing.assert_array_equal(outs["np"][0][keep], source[keep])
    np.testing.assert_array_equal(outs["pt"][0].permute(0, 2, 3, 1).numpy(), outs["np"][0])
    assert len(outs["pil"][0]) == NUM_FRAMES and outs["pil"][0][0].size == (WIDTH, HEIGHT)


# ---------------------------------------------------------------------- end to end
def test_both_inversion_branches_run_at_the_default_ratio():
    pipe = make_pipe()
    models = dict(unet=pipe.unet, inversion_unet=pipe.inversion_unet, video_unet=pipe.video_unet)
    with count_forward_calls(**models) as calls:
        pipe(**inputs(output_type="latent", return_idm_frames=False))
    assert calls == {"unet": 2, "inversion_unet": 2, "video_unet": 2 + 2}


def test_plain_sd_unet_inpaints_by_latent_blending_and_inverts_itself():
    pipe = make_pipe(unet=tiny_unet(in_channels=4), inversion_unet=None)
    with count_forward_calls(unet=pipe.unet, video_unet=pipe.video_unet) as calls:
        out = pipe(**inputs(output_type="latent", return_idm_frames=False))
    assert calls == {"unet": 2 + 2, "video_unet": 2 + 2}
    assert out.frames.shape == (1, 4, NUM_FRAMES, HEIGHT // 2, WIDTH // 2)


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mask=mask_video(num_frames=2)), "`mask` has 2 frames but `video` has 3"),
        (dict(mask=[PIL.Image.new("L", (WIDTH, HEIGHT))] * 4), "`mask` has 4 frames"),
        (dict(mask=mask_video(size=16)), "resize the mask"),
        (dict(mask=np.zeros((HEIGHT, WIDTH + 8))), "resize the mask"),
        (dict(mask=mask_video() * 255), r"must lie in \[0, 1\]"),
        (dict(outpaint="horizontal"), "exactly one of `mask`.*got both"),
        (dict(mask=None), "exactly one of `mask`.*got neither"),
        (dict(mask=None, outpaint="diagonal"), "Unknown `outpaint`"),
        (dict(mask=None, outpaint=(0, 0, 40, 0)), "nothing of the 32x32 frame"),
        (dict(height=30), "divisible by 8"),
        (dict(width=36, height=32), "divisible by 8"),
        (dict(paste_back=True, output_type="latent"), "paste_back"),
        (dict(paste_back=True, paste_back_feather=-1), "paste_back_feather"),
        (dict(prompt=None), "`prompt` must be a string"),
        (dict(generator=generators(2)), "one per frame"),
        (dict(latents=torch.zeros(1, 4, 2, 16, 16)), "frames"),
        (dict(mixing_ratio=-0.5), "mixing_ratio"),
    ],
)
def test_bad_input_fails_before_any_model_runs(pipe, overrides, message):
    with count_forward_calls(**all_models(pipe)) as calls:
        with pytest.raises(ValueError, match=message):
            pipe(**inputs(**overrides))
    assert sum(calls.values()) == 0


def test_image_inversion_without_inversion_unet_names_it_before_running():
    pipe = make_pipe(inversion_unet=None)
    with count_forward_calls(**all_models(pipe)) as calls:
        with pytest.raises(ValueError, match="Pass `inversion_unet`"):
            pipe(**inputs(mixing_ratio=0.1))
    assert sum(calls.values()) == 0
    out = pipe(**inputs(mixing_ratio=0.0, output_type="latent"))
    assert out.frames.shape == (1, 4, NUM_FRAMES, HEIGHT // 2, WIDTH // 2)
