import os
import stat
import subprocess

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from bivdiff import video_io
from bivdiff.video_io import (
    default_clip_path,
    default_mask_path,
    gif_delays_ms,
    read_video,
    read_video_clip,
    resize_frames,
    target_size,
    to_numpy_frames,
    to_pil_frames,
    write_video,
)

NUM_FRAMES = 12


def indexed_frames(num_frames=NUM_FRAMES, height=32, width=48):
    """Uniform frames whose grey level encodes their index (20 levels apart, so lossy codecs keep it)."""
    levels = 10 + 20 * np.arange(num_frames, dtype=np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def frame_indices(frames):
    return [round((np.asarray(f, dtype=float).mean() - 10) / 20) for f in frames]


def textured_frames(num_frames=4, height=40, width=56, seed=0):
    """Smooth random colour texture, different per frame: lossy codecs keep it close."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (num_frames, height // 8, width // 8, 3), dtype=np.uint8)
    return np.stack(
        [np.asarray(Image.fromarray(c).resize((width, height), Image.Resampling.BILINEAR)) for c in coarse]
    )


@pytest.fixture(params=["mp4", "gif", "folder"])
def indexed_video(request, tmp_path):
    path = tmp_path / ("video" if request.param == "folder" else f"video.{request.param}")
    write_video(indexed_frames(), path, fps=10)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Frame selection


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, list(range(NUM_FRAMES))),
        ({"num_frames": 3}, [0, 1, 2]),
        ({"num_frames": 3, "stride": 2, "start": 1}, [1, 3, 5]),
        ({"num_frames": 4, "stride": 3}, [0, 3, 6, 9]),
        ({"stride": 3, "start": 2}, [2, 5, 8, 11]),
        ({"num_frames": 2, "stride": 5, "start": 6}, [6, 11]),
    ],
)
def test_selection_picks_the_right_frames(indexed_video, kwargs, expected):
    assert frame_indices(read_video(indexed_video, **kwargs)) == expected


def test_too_few_frames_names_file_counts_and_fix(indexed_video):
    with pytest.raises(ValueError) as info:
        read_video(indexed_video, num_frames=5, stride=3, start=1)
    message = str(info.value)
    assert str(indexed_video) in message
    assert f"has {NUM_FRAMES} frames" in message
    assert "needs 14" in message  # 1 + 4 * 3 + 1
    assert "Lower num_frames or stride" in message
    assert "4 frames fit" in message


def test_start_past_the_end_is_refused(indexed_video):
    with pytest.raises(ValueError, match="start"):
        read_video(indexed_video, start=NUM_FRAMES)


def test_reading_stops_at_the_last_frame_needed():
    consumed = []

    def stream():
        for index in range(100):
            consumed.append(index)
            yield lambda index=index: index

    picked = video_io.select_frames(stream(), "clip", num_frames=3, stride=4, start=2)
    assert picked == [2, 6, 10]
    assert consumed == list(range(11))


def test_folder_reads_open_only_the_chosen_frames(tmp_path, monkeypatch):
    write_video(indexed_frames(), tmp_path / "frames", fps=10)
    opened = []
    original = iio.imread
    monkeypatch.setattr(iio, "imread", lambda file, **kwargs: opened.append(file.name) or original(file, **kwargs))
    frames = read_video(tmp_path / "frames", num_frames=2, stride=5)
    assert opened == ["00000.png", "00005.png"]
    assert frame_indices(frames) == [0, 5]


def test_folder_sorts_naturally(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for index in (10, 2, 1):
        Image.fromarray(indexed_frames(1)[0] * 0 + 10 + 20 * index).save(folder / f"frame{index}.png")
    (folder / "notes.txt").write_text("not a frame")
    assert frame_indices(read_video(folder)) == [1, 2, 10]


@pytest.mark.parametrize("kwargs", [{"num_frames": 0}, {"stride": 0}, {"start": -1}, {"resize_mode": "stretch"}])
def test_bad_selection_arguments_are_refused(indexed_video, kwargs):
    with pytest.raises(ValueError):
        read_video(indexed_video, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Errors naming the file


@pytest.mark.parametrize("name", ["missing.mp4", "missing.gif", "missing_folder"])
def test_missing_input_names_the_path(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=name):
        read_video(tmp_path / name)


@pytest.mark.parametrize("name", ["broken.mp4", "broken.gif"])
def test_unreadable_video_names_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(ValueError, match=name):
        read_video(path)


def test_truncated_mp4_names_the_file(tmp_path):
    path = tmp_path / "cut.mp4"
    write_video(textured_frames(8), path, fps=10)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.mp4"):
        read_video(path)


def test_unreadable_frame_in_folder_names_the_file(tmp_path):
    folder = tmp_path / "frames"
    write_video(indexed_frames(3), folder, fps=10)
    (folder / "00001.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="00001.png"):
        read_video(folder)


def test_folder_without_images_names_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        read_video(tmp_path / "empty")


def test_rotated_video_reads_upright(tmp_path):
    import imageio_ffmpeg

    frames = textured_frames(3)
    plain = write_video(frames, tmp_path / "plain.mp4", fps=8)
    rotated = tmp_path / "rotated.mp4"
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-display_rotation:v:0", "90"]
    if subprocess.run([*command, "-i", str(plain), "-c", "copy", str(rotated)], check=False).returncode != 0:
        pytest.skip("this ffmpeg cannot tag a rotation")
    upright = np.rot90(to_numpy_frames(read_video(plain)), 1, axes=(1, 2))
    np.testing.assert_allclose(to_numpy_frames(read_video(rotated)), upright, atol=2)


# ---------------------------------------------------------------------------------------------------------------
# Round trips


def test_mp4_round_trip_within_codec_tolerance(tmp_path):
    frames = textured_frames(6)
    clip = read_video_clip(write_video(frames, tmp_path / "a.mp4", fps=12), as_mask=False)
    assert clip.fps == pytest.approx(12)
    decoded = to_numpy_frames(clip.frames)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3


def test_mp4_odd_size_is_padded_to_even_not_rescaled(tmp_path):
    frames = textured_frames(3, height=33, width=47)
    decoded = to_numpy_frames(read_video(write_video(frames, tmp_path / "odd.mp4", fps=8)))
    assert decoded.shape == (3, 34, 48, 3)
    assert np.abs(decoded[:, :33, :47].astype(int) - frames).mean() < 3


def test_gif_round_trip_is_exact_for_few_colours(tmp_path):
    frames = indexed_frames(5)
    frames[:, 4:12, 6:20] = (255, 0, 0)
    clip = read_video_clip(write_video(frames, tmp_path / "a.gif", fps=10))
    assert clip.fps == pytest.approx(10)
    np.testing.assert_array_equal(to_numpy_frames(clip.frames), frames)


def test_gif_keeps_identical_frames_and_loops_forever(tmp_path):
    still = np.repeat(textured_frames(1), 6, axis=0)
    path = write_video(still, tmp_path / "still.gif", fps=8)
    assert len(read_video(path)) == 6
    with Image.open(path) as gif:
        assert gif.info["loop"] == 0
        delays = []
        for index in range(gif.n_frames):
            gif.seek(index)
            delays.append(gif.info["duration"])
    assert delays == [130, 120, 130, 120, 130, 120]  # 12.5 cs a frame, the running total rounded half up


@pytest.mark.parametrize("num_frames, fps", [(6, 8), (7, 24), (10, 3), (5, 25)])
def test_gif_delays_are_whole_centiseconds_that_keep_time(num_frames, fps):
    delays = gif_delays_ms(num_frames, fps)
    assert all(d % 10 == 0 and d > 0 for d in delays)
    for count in range(1, num_frames + 1):
        assert abs(sum(delays[:count]) - 1000 * count / fps) <= 5


def test_folder_round_trip_is_exact(tmp_path):
    frames = textured_frames(4)
    folder = write_video(frames, tmp_path / "frames", fps=8)
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(4)]
    clip = read_video_clip(folder)
    assert clip.fps is None
    np.testing.assert_array_equal(to_numpy_frames(clip.frames), frames)


def test_folder_write_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "keep.txt").write_text("earlier run")
    with pytest.raises(FileExistsError, match="frames"):
        write_video(textured_frames(2), tmp_path / "frames", fps=8)
    assert (tmp_path / "frames" / "keep.txt").read_text() == "earlier run"


def test_write_refuses_unknown_extension_and_bad_fps(tmp_path):
    with pytest.raises(ValueError, match=r"\.avi"):
        write_video(textured_frames(2), tmp_path / "a.avi", fps=8)
    with pytest.raises(ValueError, match="fps"):
        write_video(textured_frames(2), tmp_path / "a.mp4", fps=0)
    with pytest.raises(ValueError, match="mp4"):
        write_video(textured_frames(2), tmp_path / "a.gif", fps=60)


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes


@pytest.mark.parametrize("name", ["out.gif", "out.mp4"])
def test_a_crash_mid_write_leaves_the_old_file_and_no_partial(tmp_path, monkeypatch, name):
    final = tmp_path / name
    final.write_text("earlier")

    def write_half_then_crash(path, *args, **kwargs):
        path.write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(video_io, "_write_gif", lambda array, path, fps: write_half_then_crash(path))
    monkeypatch.setattr(iio, "imwrite", write_half_then_crash)  # the MP4 writer
    with pytest.raises(KeyboardInterrupt):
        write_video(textured_frames(2), final, fps=8)
    assert [(p.name, p.read_text()) for p in tmp_path.iterdir()] == [(name, "earlier")]


def test_a_crash_mid_folder_write_leaves_nothing(tmp_path, monkeypatch):
    save = Image.Image.save
    saved = []

    def save_once_then_crash(self, path, *args, **kwargs):
        if saved:
            raise KeyboardInterrupt
        saved.append(path)
        save(self, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_once_then_crash)
    with pytest.raises(KeyboardInterrupt):
        write_video(textured_frames(3), tmp_path / "frames", fps=8)
    assert saved and list(tmp_path.iterdir()) == []


def test_written_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("a.mp4", "a.gif"):
        mode = stat.S_IMODE((write_video(textured_frames(2), tmp_path / name, fps=8)).stat().st_mode)
        assert mode == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------------------------
# Geometry


def bands(width=64, height=32):
    """Red left quarter, green middle half, blue right quarter."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 4] = (255, 0, 0)
    image[:, width // 4 : 3 * width // 4] = (0, 255, 0)
    image[:, 3 * width // 4 :] = (0, 0, 255)
    return Image.fromarray(image)


def test_crop_keeps_the_centre():
    (out,) = resize_frames([bands()], height=32, width=32, resize_mode="crop")
    np.testing.assert_array_equal(np.asarray(out), np.broadcast_to(np.uint8([0, 255, 0]), (32, 32, 3)))


def test_pad_letterboxes_with_black():
    (out,) = resize_frames([bands()], height=64, width=64, resize_mode="pad")
    out = np.asarray(out)
    assert out.shape == (64, 64, 3)
    assert out[:16].max() == 0 and out[48:].max() == 0
    np.testing.assert_array_equal(out[16:48], np.asarray(bands()))


def test_resize_stretches_to_the_exact_size():
    (out,) = resize_frames([bands()], height=64, width=32, resize_mode="resize")
    out = np.asarray(out)
    assert out.shape == (64, 32, 3)
    # Away from the band edges, where the resampling filter blends colours.
    assert (out[:, :4] == (255, 0, 0)).all() and (out[:, 12:20] == (0, 255, 0)).all()


@pytest.mark.parametrize(
    "source, height, width, expected",
    [
        ((512, 288), None, None, (512, 288)),
        ((512, 288), 512, 512, (512, 512)),
        ((512, 288), 100, 203, (200, 96)),
        ((512, 288), 256, None, (448, 256)),  # 455.1 -> 448
        ((512, 288), None, 256, (256, 144)),
        ((512, 288), 3, 3, (8, 8)),
        ((100, 1000), None, 64, (64, 640)),
    ],
)
def test_target_size_rounds_down_to_multiples_of_8(source, height, width, expected):
    assert target_size(source, height, width) == expected


def test_read_resizes_with_one_side_given():
    frames = read_video(default_clip_path(), num_frames=2, height=100)
    assert frames[0].size == (168, 96)  # height 100 -> 96; width 512 * 96 / 288 = 170.7 -> 171 -> 168


# ---------------------------------------------------------------------------------------------------------------
# Masks


def test_masks_stay_grayscale_with_hard_edges(tmp_path):
    mask = np.zeros((4, 36, 60), np.uint8)
    mask[:, 9:27, 15:45] = 255
    path = write_video(np.repeat(mask[..., None], 3, axis=-1), tmp_path / "mask", fps=8)
    for mode in ("crop", "pad", "resize"):
        frames = read_video(path, height=48, width=40, resize_mode=mode, as_mask=True)
        values = np.stack([np.asarray(f) for f in frames])
        assert all(f.mode == "L" for f in frames)
        assert values.shape == (4, 48, 40)
        assert set(np.unique(values)) == {0, 255}  # nearest neighbour: no blended greys


def test_mp4_mask_reads_as_luma(tmp_path):
    mask = np.zeros((3, 32, 48), np.uint8)
    mask[:, 8:24, 12:36] = 255
    frames = read_video(write_video(mask, tmp_path / "mask.mp4", fps=8), as_mask=True)
    values = np.stack([np.asarray(f) for f in frames])
    assert values.shape == (3, 32, 48)
    assert values[:, 12:20, 18:30].min() >= 250 and values[:, :4].max() <= 5


# ---------------------------------------------------------------------------------------------------------------
# Conversion


def test_conversions_agree_across_input_types():
    frames = textured_frames(3)
    as_float = frames / 255.0
    expected = frames
    np.testing.assert_array_equal(to_numpy_frames(as_float), expected)
    np.testing.assert_array_equal(to_numpy_frames(torch.from_numpy(as_float).permute(0, 3, 1, 2)), expected)
    np.testing.assert_array_equal(to_numpy_frames(torch.from_numpy(as_float)), expected)
    np.testing.assert_array_equal(to_numpy_frames([Image.fromarray(f) for f in frames]), expected)
    np.testing.assert_array_equal(to_numpy_frames(list(frames)), expected)
    bf16 = to_numpy_frames(torch.from_numpy(as_float).to(torch.bfloat16))
    assert np.abs(bf16.astype(int) - expected).max() <= 2
    np.testing.assert_array_equal(np.stack([np.asarray(f) for f in to_pil_frames(as_float)]), expected)


def test_grayscale_frames_become_rgb():
    gray = textured_frames(2)[..., 0]
    np.testing.assert_array_equal(to_numpy_frames(gray), np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(
        to_numpy_frames([Image.fromarray(g) for g in gray]), np.repeat(gray[..., None], 3, -1)
    )


def test_bool_masks_become_black_and_white():
    mask = np.zeros((2, 8, 8), bool)
    mask[:, 2:6, 2:6] = True
    np.testing.assert_array_equal(to_numpy_frames(torch.from_numpy(mask)[:, None])[..., 0], mask * 255)


def test_float_overshoot_is_clipped():
    frames = np.full((1, 8, 8, 3), 1.04)
    frames[..., 0] = -0.03
    np.testing.assert_array_equal(to_numpy_frames(frames)[0, 0, 0], [0, 255, 255])


@pytest.mark.parametrize(
    "frames, match",
    [
        (np.full((2, 8, 8, 3), 200.0), "Divide"),
        (np.full((2, 8, 8, 3), -1.0), r"\(x \+ 1\) / 2"),
        (np.zeros((2, 3, 8, 8), np.uint8), "transpose"),
        (torch.zeros(1, 2, 3, 8, 8), r"video\[0\]"),
        ([], "empty"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 16, 3), np.uint8)], "Frame 1"),
    ],
)
def test_bad_frames_are_refused_with_the_fix(frames, match):
    with pytest.raises(ValueError, match=match):
        to_numpy_frames(frames)


# ---------------------------------------------------------------------------------------------------------------
# Shipped media


def test_shipped_clip_reads_with_its_attribution():
    clip = read_video_clip(default_clip_path())
    assert len(clip.frames) == 132
    assert clip.fps == pytest.approx(25)
    assert clip.frames[0].size == (512, 288)
    attribution = (default_clip_path().parent / "ATTRIBUTION.md").read_text()
    assert "Blender Foundation" in attribution and "Creative Commons Attribution 3.0" in attribution
    assert default_clip_path().name in attribution and default_mask_path().name in attribution


def test_shipped_mask_matches_the_clip():
    clip = read_video_clip(default_mask_path(), as_mask=True)
    assert len(clip.frames) == 132
    assert clip.fps == pytest.approx(25)
    assert clip.frames[0].size == (512, 288)
    first, last = np.asarray(clip.frames[0]), np.asarray(clip.frames[-1])
    assert first[144, 256] >= 250 and first[0, 0] <= 5 and first[144, 20] <= 5
    assert np.abs(first.astype(int) - last).max() <= 2
