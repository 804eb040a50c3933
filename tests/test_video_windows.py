"""Long videos: the video UNet over overlapping temporal windows."""

import pytest
import torch
from pipeline_helpers import bivdiff_components, count_forward_calls

from bivdiff import BIVDiffPipeline
from bivdiff.pipelines.mixed_inversion import temporal_windows, video_windows_for_clip, window_weights


@pytest.mark.parametrize(
    "frames, size, overlap, expected",
    [
        (8, 16, 4, [(0, 8)]),
        (8, None, 4, [(0, 8)]),
        (16, 8, 4, [(0, 8), (4, 12), (8, 16)]),
        (14, 8, 4, [(0, 8), (4, 12), (6, 14)]),
        (10, 8, 0, [(0, 8), (2, 10)]),
    ],
)
def test_windows_cover_every_frame_with_full_size(frames, size, overlap, expected):
    windows = temporal_windows(frames, size, overlap)
    assert windows == expected
    assert all(stop - start == min(frames, size or frames) for start, stop in windows)


def test_weights_ramp_only_where_windows_meet():
    assert window_weights(6, 2, first=True, last=True).tolist() == [1] * 6
    middle = window_weights(6, 2, first=False, last=False)
    torch.testing.assert_close(middle, torch.tensor([1 / 3, 2 / 3, 1, 1, 2 / 3, 1 / 3]))


class FrameWiseVideoUNet(torch.nn.Module):
    """A video 'UNet' whose output for a frame depends on that frame only: windows must not change it."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.conv = torch.nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1))

    @property
    def dtype(self):
        return self.conv.weight.dtype

    @property
    def device(self):
        return self.conv.weight.device

    def forward(self, sample, timestep, encoder_hidden_states):
        out = self.conv(sample) + encoder_hidden_states.mean() + float(timestep) / 1000
        return type("Out", (), {"sample": out})()


@torch.no_grad()
def test_windowed_smoothing_equals_whole_clip_for_a_framewise_model_and_bounds_the_window():
    pipe = BIVDiffPipeline(**bivdiff_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.register_modules(video_unet=FrameWiseVideoUNet(pipe.video_unet.config))
    latents = torch.randn(1, 4, 10, 8, 8, generator=torch.Generator().manual_seed(0))
    pos, neg = pipe.encode_video_prompt("a cat", "cpu")
    whole = pipe.temporal_smoothing(latents, pos, neg, 3, 7.5)
    pipe.enable_video_windows(size=4, overlap=2)
    widths = []
    pipe.video_unet.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[2]))
    windowed = pipe.temporal_smoothing(latents, pos, neg, 3, 7.5)
    torch.testing.assert_close(windowed, whole, atol=1e-5, rtol=0)
    assert set(widths) == {4} and len(widths) == 3 * len(temporal_windows(10, 4, 2))


@torch.no_grad()
def test_windowed_inversion_runs_one_call_per_window_with_the_real_video_unet():
    pipe = BIVDiffPipeline(**bivdiff_components())
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = pipe.encode_video_prompt("", "cpu")[0]
    pipe.enable_video_windows(size=4, overlap=2)
    with count_forward_calls(video_unet=pipe.video_unet) as calls:
        windowed = pipe.invert_video_branch(latents, cond, 2)
    assert calls["video_unet"] == 2 * 2
    pipe.disable_video_windows()
    whole = pipe.invert_video_branch(latents, cond, 2)
    assert windowed.shape == whole.shape and torch.isfinite(windowed).all()


def test_bad_overlap_is_refused():
    pipe = BIVDiffPipeline(**bivdiff_components())
    with pytest.raises(ValueError, match="overlap"):
        pipe.enable_video_windows(size=4, overlap=4)


# ---------------------------------------------------------------------------------------------------------------
# default windows: a clip longer than the video model's native length runs in windows of that length
# ---------------------------------------------------------------------------------------------------------------


def test_a_model_of_unknown_length_runs_any_clip_whole():
    assert video_windows_for_clip(100, None) is None


@pytest.mark.parametrize(
    "frames, native, expected",
    [(8, 16, None), (16, 16, None), (17, 16, (16, 4)), (24, 16, (16, 4)), (12, 8, (8, 4)), (5, 4, (4, 2))],
)
def test_longer_clips_get_native_windows_shorter_run_whole(frames, native, expected):
    chosen = video_windows_for_clip(frames, native)
    assert chosen == expected and all(type(value) is int for value in chosen or ())
    size, overlap = expected or (None, 0)
    windows = temporal_windows(frames, size, overlap)
    assert all(stop - start == min(frames, native) for start, stop in windows)


@pytest.mark.parametrize("user", [None, (8, 2), (32, 4)])
def test_windows_the_user_set_win(user):
    assert video_windows_for_clip(40, 16, user_windows=user) == user
    assert video_windows_for_clip(4, 16, user_windows=user) == user


def test_a_clip_longer_than_the_video_models_native_length_runs_in_its_windows_unless_told():
    pipe = BIVDiffPipeline(**bivdiff_components())
    pipe.video_unet.register_to_config(native_num_frames=4)
    assert pipe.temporal_windows_for(3) == pipe.temporal_windows_for(4) == (None, 0)
    assert pipe.temporal_windows_for(10) == (4, 2)  # overlap min(4, 4 // 2)
    pipe.enable_video_windows(6, 1)
    assert pipe.temporal_windows_for(10) == pipe.temporal_windows_for(3) == (6, 1)
    pipe.disable_video_windows()
    assert pipe.temporal_windows_for(10) == (None, 0)


def test_blended_windows_are_the_documented_weighted_average():
    """Oracle: each frame's prediction from every window holding it, weighted 1 inside a window and by the linear
    ramps k / (overlap + 1) where two windows meet, divided by the sum of its weights. The prediction depends on
    the window's other frames, so every ramp shows."""
    pipe = BIVDiffPipeline(**bivdiff_components())
    pipe.enable_video_windows(size=4, overlap=2)
    sample = torch.randn(1, 2, 10, 3, 3, generator=torch.Generator().manual_seed(9))
    sizes = []

    def predict(window, frames):
        assert window.shape[2] == frames.stop - frames.start
        sizes.append(window.shape[2])
        return window * window.mean(dim=2, keepdim=True)

    out = pipe.blend_windows(sample, 2, predict)
    windows, overlap = [(0, 4), (2, 6), (4, 8), (6, 10)], 2
    total, norm = torch.zeros_like(sample), torch.zeros(10)
    for i, (start, stop) in enumerate(windows):
        window = sample[:, :, start:stop]
        prediction = window * window.mean(dim=2, keepdim=True)
        for f in range(start, stop):
            weight = 1.0
            if i > 0 and f < start + overlap:
                weight = (f - start + 1) / (overlap + 1)
            if i < len(windows) - 1 and f >= stop - overlap:
                weight = (stop - f) / (overlap + 1)
            total[:, :, f] += weight * prediction[:, :, f - start]
            norm[f] += weight
    assert sizes == [4, 4, 4, 4]
    torch.testing.assert_close(out, total / norm.view(1, 1, -1, 1, 1), atol=1e-6, rtol=0)
