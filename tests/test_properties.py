"""Rules with many cases, checked on generated cases (hypothesis) rather than a few hand-picked ones."""

import types

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bivdiff import BIVDiffDDIMInverseScheduler, MixedInversionMixin
from bivdiff.pipelines.mixed_inversion import fold_frames, temporal_windows, unfold_frames, window_weights
from bivdiff.pipelines.pipeline_bivdiff_inpaint import outpaint_mask
from bivdiff.tiny_models import sd15_scheduler_config

FAST = settings(max_examples=40, deadline=None)


@FAST
@given(batch=st.integers(1, 4), frames=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_fold_and_unfold_are_inverses_frame_major(batch, frames, seed):
    latents = torch.randn(batch, 2, frames, 3, 2, generator=torch.Generator().manual_seed(seed))
    folded = fold_frames(latents)
    assert folded.shape == (batch * frames, 2, 3, 2)
    for b in range(batch):
        for f in range(frames):
            assert torch.equal(folded[b * frames + f], latents[b, :, f])
    assert torch.equal(unfold_frames(folded, frames), latents)
    assert torch.equal(fold_frames(unfold_frames(folded, frames)), folded)


class FramewiseUNet:
    """Stands in for a video UNet: frame f of the output is (f's value + 1) * 2, whatever window it is seen in."""

    def __call__(self, sample, timestep, encoder_hidden_states):
        return types.SimpleNamespace(sample=(sample + 1) * 2)


@FAST
@given(data=st.data())
def test_window_weights_cover_every_frame_and_blend_to_one(data):
    num_frames = data.draw(st.integers(1, 40), label="frames")
    size = data.draw(st.integers(1, 16), label="size")
    overlap = data.draw(st.integers(0, size - 1), label="overlap")
    windows = temporal_windows(num_frames, size, overlap)

    assert windows[0][0] == 0 and windows[-1][1] == num_frames
    assert all(stop - start == min(size, num_frames) for start, stop in windows)
    assert all(b_start <= a_stop - min(overlap, size) for (_, a_stop), (b_start, _) in zip(windows, windows[1:]))
    total = torch.zeros(num_frames)
    for i, (start, stop) in enumerate(windows):
        weights = window_weights(stop - start, overlap, i == 0, i == len(windows) - 1)
        assert (weights > 0).all() and (weights <= 1).all()
        total[start:stop] += weights
    assert (total > 0).all()  # every frame is covered with a positive weight

    # Normalised weights sum to one: when every window agrees on a frame, the blend is exactly that value.
    unet = FramewiseUNet()
    stub = types.SimpleNamespace(_video_windows=(size, overlap), video_unet_residuals=lambda *args: {},
                                 video_unet_noise=lambda z, t, c, image: unet(z, t, c).sample)
    stub.temporal_windows_for = lambda n: MixedInversionMixin.temporal_windows_for(stub, n)
    stub.blend_windows = lambda *args: MixedInversionMixin.blend_windows(stub, *args)
    sample = torch.arange(num_frames, dtype=torch.float32).view(1, 1, -1, 1, 1).expand(1, 2, -1, 2, 2)
    blended = MixedInversionMixin.video_noise_prediction(stub, sample, 1, torch.zeros(1, 3, 4))
    torch.testing.assert_close(blended, (sample + 1) * 2, atol=1e-5, rtol=1e-6)


@FAST
@given(height=st.integers(1, 96), width=st.integers(1, 96), direction=st.sampled_from(["horizontal", "vertical"]))
def test_band_outpaint_masks_regenerate_the_outer_quarters(height, width, direction):
    mask = outpaint_mask(height, width, direction)
    assert mask.shape == (height, width) and mask.dtype == np.float32
    length = height if direction == "horizontal" else width
    index = np.arange(length)
    band = ((index < length // 4) | (index >= length // 4 * 3)).astype(np.float32)
    expected = band[:, None] * np.ones(width) if direction == "horizontal" else np.ones((height, 1)) * band
    np.testing.assert_array_equal(mask, expected)


@FAST
@given(size=st.integers(1, 16), data=st.data())
def test_window_weights_ramp_linearly_over_the_overlaps(size, data):
    overlap = data.draw(st.integers(0, size - 1), label="overlap")
    first, last = data.draw(st.booleans(), label="first"), data.draw(st.booleans(), label="last")
    # Ramps that meet (2 * overlap > size, in a middle window) overwrite each other rather than forming a tent;
    # the blend stays a convex combination, so only the plain case is pinned here.
    assume(first or last or 2 * overlap <= size)
    weights = window_weights(size, overlap, first, last)
    expected = torch.ones(size)
    for i in range(size):
        if not first:
            expected[i] = min(expected[i], (i + 1) / (overlap + 1))
        if not last:
            expected[i] = min(expected[i], (size - i) / (overlap + 1))
    torch.testing.assert_close(weights, expected)


@FAST
@given(data=st.data())
def test_margin_outpaint_masks_regenerate_exactly_the_margins(data):
    height, width = data.draw(st.integers(2, 64), label="height"), data.draw(st.integers(2, 64), label="width")
    top = data.draw(st.integers(0, height - 1), label="top")
    bottom = data.draw(st.integers(0, height - 1 - top), label="bottom")
    left = data.draw(st.integers(0, width - 1), label="left")
    right = data.draw(st.integers(0, width - 1 - left), label="right")
    if top + bottom + left + right == 0:
        return
    mask = outpaint_mask(height, width, (top, bottom, left, right))
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    expected = (rows < top) | (rows >= height - bottom) | (cols < left) | (cols >= width - right)
    np.testing.assert_array_equal(mask, expected.astype(np.float32))
    as_dict = outpaint_mask(height, width, {"top": top, "bottom": bottom, "left": left, "right": right})
    np.testing.assert_array_equal(as_dict, mask)


@settings(max_examples=60, deadline=None)
@given(
    spacing=st.sampled_from(["leading", "trailing", "linspace"]),
    num_steps=st.integers(1, 1000),
    steps_offset=st.integers(0, 1),
)
def test_inversion_always_moves_to_a_noisier_level(spacing, num_steps, steps_offset):
    config = {**sd15_scheduler_config(), "timestep_spacing": spacing, "steps_offset": steps_offset}
    scheduler = BIVDiffDDIMInverseScheduler(**config)
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.tolist()
    assert 1 <= len(timesteps) <= num_steps and 0 <= timesteps[0]
    targets = [scheduler.next_timestep(t) for t in timesteps]
    assert all(t < target <= 999 for t, target in zip(timesteps, targets))
    assert targets[:-1] == timesteps[1:]  # each step starts where the one before ended


@pytest.mark.parametrize(
    "margins, fails",
    [
        ((0, 0, 1, 1), False),
        ((1, 1, 0, 0), False),
        ((0, 0, 2, 1), False),
        ((0, 0, 5, 3), True),  # left + right == width
        ((0, 0, 8, 0), True),
        ((4, 4, 0, 0), True),  # top + bottom == height
        ((0, 0, 0, 0), True),
    ],
)
def test_margins_must_leave_something_and_regenerate_something(margins, fails):
    if fails:
        with pytest.raises(ValueError, match="outpaint"):
            outpaint_mask(8, 8, margins)
    else:
        assert 0 < outpaint_mask(8, 8, margins).sum() < 64
