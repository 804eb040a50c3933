"""Reading and writing videos: MP4 (through imageio-ffmpeg), GIF (through Pillow) and folders of images.

Frames travel as lists of PIL images, the form the diffusers image pipelines take and return. Readers pick
frames `start, start + stride, ...` and stop decoding at the last frame they need, so a short clip from a
long video costs only the frames up to its end. Writers go to a temporary name beside the target and rename
it when complete, so an interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
RESIZE_MODES = ("crop", "pad", "resize")
# imageio-ffmpeg maps quality q to x264's CRF as int((1 - q / 10) * 51): 8 gives CRF 10, visually lossless
# for generated frames, which a later evaluation or a second pass reads back.
_MP4_QUALITY = 8
# GIF delays are whole 1/100 s; browsers slow any delay under 2/100 s down to 1/10 s.
_GIF_MAX_FPS = 50.0
# ffmpeg's default YUV<->RGB conversion truncates (about -1 grey level on average) and upsamples chroma coarsely;
# these flags round exactly and interpolate chroma fully, cutting a round trip's error on saturated detail ~3x.
_SWS_FLAGS = ["-sws_flags", "accurate_rnd+full_chroma_int"]

_MEDIA_DIR = Path(__file__).resolve().parent / "media"


@dataclass
class VideoClip:
    """Frames read from a video and the source frame rate (None when the source has none, as a folder)."""

    frames: list[Image.Image]
    fps: float | None


def default_clip_path() -> Path:
    """The demo clip shipped with the package: 132 frames of *Big Buck Bunny* at 25 fps, 512x288.

    Its attribution (CC-BY 3.0, Blender Foundation) is `media/ATTRIBUTION.md` beside it.
    """
    return _MEDIA_DIR / "big_buck_bunny_512x288_25fps.mp4"


def default_mask_path() -> Path:
    """A mask video for inpainting demos with the demo clip: a white ellipse over the centre on black,
    same frame count, frame rate and size as `default_clip_path()` (white = regenerate)."""
    return _MEDIA_DIR / "big_buck_bunny_mask.mp4"


# ----------------------------------------------------------------------------------------------------------
# Reading


def read_video(
    path: str | os.PathLike,
    num_frames: int | None = None,
    stride: int = 1,
    start: int = 0,
    height: int | None = None,
    width: int | None = None,
    resize_mode: str = "crop",
    as_mask: bool = False,
) -> list[Image.Image]:
    """Read frames `start, start + stride, ...` (at most `num_frames`, all to the end when None) from an MP4
    (or any video ffmpeg reads), a GIF, or a folder of images sorted naturally (`frame2` before `frame10`).

    Sizes: with neither `height` nor `width` the frames keep the source size. A given size is rounded down to a
    multiple of 8 (never below 8), since the VAE downsamples by 8; with only one of them given, the other
    follows the source aspect ratio (then is rounded the same way). `resize_mode` says how the source fits the
    target: "crop" scales to cover it and crops the centre (aspect ratio kept), "pad" scales to fit inside it
    and letterboxes with black, "resize" stretches to the exact size.

    `as_mask=True` returns grayscale ("L") frames resized with nearest neighbour, so mask edges are not blended
    into greys by the resize (binarising is left to the caller).

    Raises FileNotFoundError for a missing path, and ValueError when the source is unreadable or holds too
    few frames for `num_frames` x `stride` from `start`.
    """
    return read_video_clip(path, num_frames, stride, start, height, width, resize_mode, as_mask).frames


def read_video_clip(
    path: str | os.PathLike,
    num_frames: int | None = None,
    stride: int = 1,
    start: int = 0,
    height: int | None = None,
    width: int | None = None,
    resize_mode: str = "crop",
    as_mask: bool = False,
) -> VideoClip:
    """`read_video`, also returning the source frame rate (frames per second of the source, not divided by
    `stride`)."""
    path = Path(path)
    _check_selection(num_frames, stride, start)
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode={resize_mode!r} is not one of {RESIZE_MODES}.")
    if not path.exists():
        raise FileNotFoundError(f"No video at {path}: give the path of an MP4, a GIF or a folder of images.")

    if path.is_dir():
        loaders, fps = _folder_frames(path, as_mask), None
        frames = _select_frames(loaders, path, num_frames, stride, start)
    elif path.suffix.lower() == ".gif":
        frames, fps = _read_gif(path, num_frames, stride, start, as_mask)
    else:
        frames, fps = _read_ffmpeg(path, num_frames, stride, start, as_mask)

    if height is not None or width is not None:
        frames = resize_frames(frames, height, width, resize_mode, as_mask)
    return VideoClip(frames=frames, fps=fps)


def _check_selection(num_frames: int | None, stride: int, start: int) -> None:
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be at least 1 (or None for all frames).")
    if stride < 1:
        raise ValueError(f"stride={stride} must be at least 1.")
    if start < 0:
        raise ValueError(f"start={start} must be 0 or more.")


def _select_frames(
    loaders: Iterator[Callable[[], Image.Image]],
    path: Path,
    num_frames: int | None,
    stride: int,
    start: int,
) -> list[Image.Image]:
    """Take frames `start, start + stride, ...` from a lazy stream of frame loaders.

    Each loader is called (decoded into a PIL image) only for a chosen frame, and before the stream advances,
    so readers may hand out loaders that are valid only until their next frame. The stream is not consumed past
    the last frame needed.
    """
    last_needed = None if num_frames is None else start + (num_frames - 1) * stride
    frames: list[Image.Image] = []
    available = 0
    for index, load in enumerate(loaders):
        available = index + 1
        if index >= start and (index - start) % stride == 0:
            frames.append(load())
        if last_needed is not None and index >= last_needed:
            return frames
    if num_frames is not None or not frames:
        raise _too_few_frames(path, available, num_frames, stride, start)
    return frames


def _too_few_frames(path: Path, available: int, num_frames: int | None, stride: int, start: int) -> ValueError:
    fitting = max(0, (available - start - 1) // stride + 1)
    if available == 0:
        return ValueError(f"{path} holds no video frames: give a video with frames in it.")
    if num_frames is None:
        return ValueError(
            f"{path} has {available} frames, none at or after start={start}. Lower start below {available}."
        )
    needed = start + (num_frames - 1) * stride + 1
    return ValueError(
        f"{path} has {available} frames, but num_frames={num_frames} at stride={stride} from start={start} "
        f"needs {needed}. Lower num_frames or stride: at stride {stride}, {fitting} frames fit from start {start}."
    )


def _folder_frames(folder: Path, as_mask: bool) -> Iterator[Callable[[], Image.Image]]:
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
        key=lambda p: _natural_key(p.name),
    )
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): give a folder of frames.")
    mode = "L" if as_mask else "RGB"
    return ((lambda file=file: _open_image(file, mode)) for file in files)


def _natural_key(name: str) -> list:
    # Digit runs compare as numbers so that frame2 sorts before frame10.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _open_image(file: Path, mode: str) -> Image.Image:
    try:
        with Image.open(file) as image:
            return image.convert(mode)
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot read the frame {file}: {err}. Replace or remove the file.") from err


def _read_gif(
    path: Path, num_frames: int | None, stride: int, start: int, as_mask: bool
) -> tuple[list[Image.Image], float | None]:
    mode = "L" if as_mask else "RGB"
    durations: list[int] = []

    def loaders(image: Image.Image) -> Iterator[Callable[[], Image.Image]]:
        for frame in ImageSequence.Iterator(image):
            durations.append(frame.info.get("duration", 0))
            yield lambda frame=frame: frame.convert(mode)

    try:
        with Image.open(path) as image:
            frames = _select_frames(loaders(image), path, num_frames, stride, start)
    except (OSError, SyntaxError) as err:  # Pillow reports a corrupt GIF as either
        raise ValueError(f"Cannot read the GIF {path}: {err}. Check that the file is a complete GIF.") from err
    total_ms = sum(durations)
    return frames, (1000.0 * len(durations) / total_ms if total_ms > 0 else None)


def _read_ffmpeg(
    path: Path, num_frames: int | None, stride: int, start: int, as_mask: bool
) -> tuple[list[Image.Image], float | None]:
    import imageio_ffmpeg

    # Masks decode straight to the luma plane; colour frames to RGB.
    pix_fmt, mode, channels = ("gray", "L", 1) if as_mask else ("rgb24", "RGB", 3)
    reader = imageio_ffmpeg.read_frames(
        str(path.resolve()),
        pix_fmt=pix_fmt,
        bits_per_pixel=8 * channels,
        # Passthrough keeps every decoded frame once, where a constant-rate output would duplicate or drop
        # frames of a variable-rate video. Rotation metadata (phone videos) is applied by ffmpeg.
        output_params=["-fps_mode", "passthrough", *_SWS_FLAGS],
    )
    try:
        meta = next(reader)
        size = tuple(meta["size"])
        loaders = ((lambda data=data: Image.frombytes(mode, size, data)) for data in reader)
        frames = _select_frames(loaders, path, num_frames, stride, start)
    except (OSError, RuntimeError) as err:
        raise ValueError(
            f"Cannot read video frames from {path}: {err}\nCheck that the file is a complete video."
        ) from err
    finally:
        reader.close()  # stops ffmpeg when we leave before the end of the video
    return frames, (float(meta["fps"]) or None)


# ----------------------------------------------------------------------------------------------------------
# Resizing


def resize_frames(
    frames: list[Image.Image],
    height: int | None = None,
    width: int | None = None,
    resize_mode: str = "crop",
    as_mask: bool = False,
) -> list[Image.Image]:
    """Resize frames as `read_video` does: sizes rounded down to a multiple of 8 (at least 8), a missing side
    following the aspect ratio, `resize_mode` "crop", "pad" or "resize", nearest neighbour for masks."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode={resize_mode!r} is not one of {RESIZE_MODES}.")
    if not frames:
        return []
    size = target_size(frames[0].size, height, width)
    resample = Image.Resampling.NEAREST if as_mask else Image.Resampling.LANCZOS
    fit = {"crop": _fit_crop, "pad": _fit_pad, "resize": _fit_resize}[resize_mode]
    return [fit(frame, size, resample) for frame in frames]


def target_size(source_size: tuple[int, int], height: int | None, width: int | None) -> tuple[int, int]:
    """(width, height) of resized frames: each given side rounded down to a multiple of 8 (at least 8), a missing
    side from the source aspect ratio, the source size when neither is given."""
    src_w, src_h = source_size
    for name, value in (("height", height), ("width", width)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be a positive number of pixels.")
    if height is None and width is None:
        return src_w, src_h
    if width is None:
        height = _multiple_of_8(height)
        return _multiple_of_8(round(src_w * height / src_h)), height
    if height is None:
        width = _multiple_of_8(width)
        return width, _multiple_of_8(round(src_h * width / src_w))
    return _multiple_of_8(width), _multiple_of_8(height)


def _multiple_of_8(value: int) -> int:
    return max(8, int(value) // 8 * 8)


def _fit_resize(frame: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    return frame.resize(size, resample)


def _fit_crop(frame: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    # One resample from the centred crop box (in source pixels) straight to the target size.
    src_w, src_h = frame.size
    dst_w, dst_h = size
    if src_w * dst_h > dst_w * src_h:  # source wider than target
        crop_w = src_h * dst_w / dst_h
        box = ((src_w - crop_w) / 2, 0, (src_w + crop_w) / 2, src_h)
    else:
        crop_h = src_w * dst_h / dst_w
        box = (0, (src_h - crop_h) / 2, src_w, (src_h + crop_h) / 2)
    return frame.resize(size, resample, box=box)


def _fit_pad(frame: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    src_w, src_h = frame.size
    dst_w, dst_h = size
    scale = min(dst_w / src_w, dst_h / src_h)
    inner = (min(dst_w, max(1, round(src_w * scale))), min(dst_h, max(1, round(src_h * scale))))
    canvas = Image.new(frame.mode, size)  # zeros: black, and "keep" in a mask
    canvas.paste(frame.resize(inner, resample), ((dst_w - inner[0]) // 2, (dst_h - inner[1]) // 2))
    return canvas


# ----------------------------------------------------------------------------------------------------------
# Conversion


def to_numpy_frames(frames) -> np.ndarray:
    """Frames as a uint8 array (F, H, W, 3).

    Accepts a list of PIL images (any mode) or of arrays, a numpy array (F, H, W, 3), (F, H, W, 1) or (F, H, W),
    or a torch tensor (F, 3, H, W) or (F, H, W, 3). uint8 data is taken as [0, 255], bool as black/white masks,
    float data as [0, 1] and clipped there (a decoder overshoots a little), but float data beyond [-0.5, 1.5] is
    refused: it is almost surely [0, 255] or [-1, 1] data, which clipping would silently turn into a blank video.
    """
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("No frames: the video is empty.")
        arrays = [_pil_to_array(f) if isinstance(f, Image.Image) else _float_or_uint8(np.asarray(f)) for f in frames]
        _check_same_size(arrays)
        array = np.stack([_to_rgb(a[None])[0] for a in arrays])
    elif _is_torch_tensor(frames):
        array = _torch_to_channels_last(frames)
    else:
        array = np.asarray(frames)
        if array.ndim == 4 and array.shape[-1] not in (1, 3) and array.shape[1] in (1, 3):
            raise ValueError(
                f"A numpy video must be channels-last (F, H, W, 3); got shape {array.shape}. "
                "Transpose it with array.transpose(0, 2, 3, 1)."
            )
    array = _to_rgb(_float_or_uint8(array))
    if len(array) == 0:
        raise ValueError("No frames: the video is empty.")
    return array


def to_pil_frames(frames) -> list[Image.Image]:
    """Frames as a list of RGB PIL images; accepts everything `to_numpy_frames` does."""
    if isinstance(frames, (list, tuple)) and frames and all(isinstance(f, Image.Image) for f in frames):
        return [f if f.mode == "RGB" else f.convert("RGB") for f in frames]
    return [Image.fromarray(frame) for frame in to_numpy_frames(frames)]


def _pil_to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image if image.mode in ("RGB", "L") else image.convert("RGB"))


def _check_same_size(arrays: list[np.ndarray]) -> None:
    for index, array in enumerate(arrays):
        if array.shape[:2] != arrays[0].shape[:2]:
            raise ValueError(
                f"Frame {index} is {array.shape[1]}x{array.shape[0]} but frame 0 is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}: all frames of a video must share one size."
            )


def _is_torch_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _torch_to_channels_last(tensor) -> np.ndarray:
    if tensor.ndim != 4:
        raise ValueError(
            f"A torch video must be (F, 3, H, W) or (F, H, W, 3); got shape {tuple(tensor.shape)}. "
            "For a batch of videos pass one of them, e.g. video[0]."
        )
    tensor = tensor.detach().cpu()
    array = (tensor.float() if tensor.is_floating_point() else tensor).numpy()  # numpy has no bfloat16
    if array.shape[1] in (1, 3):  # torch's own layout first
        return array.transpose(0, 2, 3, 1)
    if array.shape[-1] in (1, 3):
        return array
    raise ValueError(f"A torch video must be (F, 3, H, W) or (F, H, W, 3); got shape {tuple(array.shape)}.")


def _float_or_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:  # a binary mask: white = True
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        low, high = float(array.min(initial=0.0)), float(array.max(initial=0.0))
        if low < -0.5 or high > 1.5:
            raise ValueError(
                f"Float frames must be in [0, 1]; these span [{low:.3g}, {high:.3g}]. "
                "Divide [0, 255] data by 255, or map [-1, 1] data with (x + 1) / 2."
            )
        return (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and array.size and 0 <= array.min() and array.max() <= 255:
        return array.astype(np.uint8)
    raise ValueError(f"Frames of dtype {array.dtype} are not supported: give uint8 in [0, 255] or float in [0, 1].")


def _to_rgb(array: np.ndarray) -> np.ndarray:
    """(F, H, W), (F, H, W, 1) or (F, H, W, 3) to (F, H, W, 3)."""
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"Expected frames shaped (F, H, W, 3), (F, H, W, 1) or (F, H, W); got {array.shape}.")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


# ----------------------------------------------------------------------------------------------------------
# Writing


def write_video(frames, path: str | os.PathLike, fps: float) -> Path:
    """Write frames to `path` and return it; the format follows the extension.

    - `.mp4`: H.264 in yuv420p through imageio-ffmpeg. yuv420p needs even sizes, so an odd width or height is
      padded by one replicated row or column (the content is never rescaled; imageio-ffmpeg's own
      macro-block resizing is switched off with macro_block_size=1).
    - `.gif`: Pillow, looping forever. GIF delays are whole 1/100 s, so each frame's delay is rounded such that
      the running total stays on the exact time (8 fps: 130 and 120 ms alternating); fps above 50 is refused.
      Every frame is stored, identical ones included, so the frame count survives a round trip.
    - no extension: a folder of PNG frames `00000.png, 00001.png, ...` (fps is not stored). An existing folder
      that holds anything is refused rather than replaced.

    `frames` is anything `to_numpy_frames` accepts. The file is written under a temporary name in the same folder
    and renamed when complete, so a crash never leaves a half-written video under `path`; an existing file at
    `path` is replaced.
    """
    path = Path(path)
    if not fps > 0:
        raise ValueError(f"fps={fps} must be positive.")
    suffix = path.suffix.lower()
    if suffix not in ("", ".mp4", ".gif"):
        raise ValueError(f"Cannot write {path}: use a .mp4 or .gif name, or a name without extension for a folder.")
    if suffix == ".gif" and fps > _GIF_MAX_FPS:
        raise ValueError(f"fps={fps} is too fast for a GIF (at most {_GIF_MAX_FPS:g}): write {path.stem}.mp4 instead.")
    array = to_numpy_frames(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == "":
        _write_folder(array, path)
    else:
        write = _write_mp4 if suffix == ".mp4" else _write_gif
        _write_atomically(path, lambda tmp: write(array, tmp, fps))
    return path


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = _temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _temporary_name(path: Path) -> Path:
    """A fresh hidden name beside `path`, keeping its extension so ffmpeg picks the container from it.

    Not created here (tempfile would create it private, mode 0600, and the rename would keep that): the writer
    creates it with the usual permissions.
    """
    return path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.part{path.suffix}")


def _write_mp4(array: np.ndarray, path: Path, fps: float) -> None:
    import imageio_ffmpeg

    array = _pad_to_even(array)
    height, width = array.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=fps,
        pix_fmt_out="yuv420p",
        quality=_MP4_QUALITY,
        macro_block_size=1,
        ffmpeg_log_level="error",
        output_params=_SWS_FLAGS,
    )
    writer.send(None)  # starts ffmpeg
    try:
        for frame in array:
            writer.send(frame)
    finally:
        writer.close()


def _pad_to_even(array: np.ndarray) -> np.ndarray:
    pad_h, pad_w = array.shape[1] % 2, array.shape[2] % 2
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return array


def _write_gif(array: np.ndarray, path: Path, fps: float) -> None:
    # Pillow's save_all merges identical consecutive frames into one (adding up their delays), which would change
    # the frame count of a still or paused video; Pillow's frame-level GIF writers keep every frame.
    from PIL import GifImagePlugin

    paletted = [Image.fromarray(frame).quantize(256) for frame in array]
    header, _ = GifImagePlugin.getheader(paletted[0], info={"loop": 0})
    with open(path, "xb") as file:
        file.writelines(header)
        for frame, delay_ms in zip(paletted, gif_delays_ms(len(array), fps)):
            file.writelines(GifImagePlugin.getdata(frame, duration=delay_ms, include_color_table=True))
        file.write(b";")  # GIF trailer


def gif_delays_ms(num_frames: int, fps: float) -> list[int]:
    """Per-frame GIF delays in ms, each a whole 1/100 s, rounded so the running total stays on frame_index / fps."""
    ends = [math.floor((index + 1) * 100 / fps + 0.5) for index in range(num_frames)]  # halves up, not to even
    return [10 * (end - begin) for begin, end in zip([0] + ends[:-1], ends)]


def _write_folder(array: np.ndarray, folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} already exists and is not an empty folder: write the frames to a new folder.")
    tmp = _temporary_name(folder)
    tmp.mkdir()
    try:
        for index, frame in enumerate(array):
            Image.fromarray(frame).save(tmp / f"{index:05d}.png")
        if folder.exists():
            folder.rmdir()  # empty, checked above; a directory rename needs the target gone on some systems
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
