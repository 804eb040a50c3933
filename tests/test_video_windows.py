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
    assert video_windows_for_clip(frames, native) == expected
    size, overlap = expected or (None, 0)
    windows = temporal_windows(frames, size, overlap)
    assert all(stop - start == min(frames, native) for start, stop in windows)


@pytest.mark.parametrize("user", [None, (8, 2), (32, 4)])
def test_windows_the_user_set_win(user):
    assert video_windows_for_clip(40, 16, user_windows=user) == user
    assert video_windows_for_clip(4, 16, user_windows=user) == user
