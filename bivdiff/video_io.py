"""Reading and writing videos (MP4 with imageio v3's ffmpeg plugin, GIF, folders of images) as lists of PIL images,
the form the diffusers image pipelines take and return. Writers go to a temporary name beside the target and rename
it when complete, so an interrupted run never leaves a half-written file under the final name."""

import contextlib
import itertools
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import GifImagePlugin, Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
RESIZE_MODES = ("crop", "pad", "resize")
# GIF delays are whole 1/100 s; browsers slow any delay under 2/100 s down to 1/10 s.
GIF_MAX_FPS = 50.0
# ffmpeg's default YUV<->RGB conversion truncates (about -1 grey level on average) and upsamples chroma coarsely;
# these flags round exactly and interpolate chroma fully, cutting a round trip's error on saturated detail ~3x.
_SWS_FLAGS = ["-sws_flags", "accurate_rnd+full_chroma_int"]
_MEDIA_DIR = Path(__file__).resolve().parent / "media"


@dataclass
class VideoClip:
    """Frames read from a video and the source frame rate (None when the source has none, as a folder)."""

    frames: list[Image.Image]
    fps: float | None


class TooFewFramesError(ValueError):
    """A readable video with fewer frames than the selection needs."""


def default_clip_path() -> Path:
    """The demo clip shipped with the package: 132 frames of *Big Buck Bunny* at 25 fps, 512x288. Its attribution
    (CC-BY 3.0, Blender Foundation) is `media/ATTRIBUTION.md` beside it."""
    return _MEDIA_DIR / "big_buck_bunny_512x288_25fps.mp4"


def default_mask_path() -> Path:
    """A mask video for inpainting demos with the demo clip: a white ellipse over the centre on black,
    same frame count, frame rate and size as `default_clip_path()` (white = regenerate)."""
    return _MEDIA_DIR / "big_buck_bunny_mask.mp4"


def read_video(path, *args, **kwargs) -> list[Image.Image]:
    """The frames of `read_video_clip`."""
    return read_video_clip(path, *args, **kwargs).frames


def read_video_clip(path, num_frames=None, stride=1, start=0, height=None, width=None, resize_mode="crop",
                    as_mask=False) -> VideoClip:
    """Frames `start, start + stride, ...` (at most `num_frames`, all to the end when None) of an MP4 (or any video
    ffmpeg reads), a GIF, or a folder of images sorted naturally (`frame2` before `frame10`), and the source's fps.

    Sizes: the source's unless `height` or `width` is given; a given side is rounded down to a multiple of 8 (at
    least 8), a missing one follows the source aspect ratio. `resize_mode`: "crop" covers the target and crops the
    centre, "pad" fits inside it with black margins, "resize" stretches. `as_mask=True` returns grayscale ("L")
    frames resized with nearest neighbour, so mask edges stay hard.

    Raises FileNotFoundError for a missing path, ValueError for an unreadable source, and TooFewFramesError (a
    ValueError) when it holds too few frames for `num_frames` x `stride` from `start`.
    """
    path = Path(path)
    for name, value, low in (("num_frames", num_frames, 1), ("stride", stride, 1), ("start", start, 0)):
        if value is not None and value < low:
            raise ValueError(f"{name}={value} must be at least {low}.")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode={resize_mode!r} is not one of {RESIZE_MODES}.")
    if not path.exists():
        raise FileNotFoundError(f"No video at {path}: give the path of an MP4, a GIF or a folder of images.")
    mode = "L" if as_mask else "RGB"
    with contextlib.closing(_frame_stream(path, mode)) as stream:
        fps = next(stream)
        frames = [Image.fromarray(f).convert(mode) for f in select_frames(stream, path, num_frames, stride, start)]
    if height is not None or width is not None:
        frames = resize_frames(frames, height, width, resize_mode, as_mask)
    return VideoClip(frames=frames, fps=fps)


def _frame_stream(path: Path, mode: str):
    """The source fps, then a lazy loader per frame; the errors of a broken file become ValueErrors naming it."""
    import imageio.v3 as iio

    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
        files.sort(key=lambda p: [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", p.name)])
        if not files:
            raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}): give a folder of frames.")

        def load(file: Path) -> np.ndarray:
            try:
                return iio.imread(file, plugin="pillow", mode=mode)
            except (OSError, ValueError) as err:
                raise ValueError(f"Cannot read the frame {file}: {err}. Replace or remove the file.") from err

        yield None
        yield from ((lambda file=file: load(file)) for file in files)
        return
    gif = path.suffix.lower() == ".gif"
    # Passthrough keeps every decoded frame once, where a constant-rate output would duplicate or drop frames of a
    # variable-rate video; ffmpeg applies rotation metadata (phone videos).
    options = {"mode": mode} if gif else {"output_params": ["-fps_mode", "passthrough", *_SWS_FLAGS]}
    try:
        with iio.imopen(path, "r", plugin="pillow" if gif else "FFMPEG") as file:
            if gif:
                delays_ms = [file.metadata(index=i).get("duration", 0) for i in range(file.properties().n_images)]
                yield 1000.0 * len(delays_ms) / sum(delays_ms) if sum(delays_ms) > 0 else None
            else:
                yield float(file.metadata()["fps"]) or None
            yield from ((lambda frame=frame: frame) for frame in file.iter(**options))
    except (OSError, RuntimeError, ValueError, SyntaxError, IndexError) as err:
        # imageio's message without ffmpeg's banner: its first part and ffmpeg's last line, the one naming the cause.
        head, _, stderr = str(err).partition("=== stderr ===")
        cause = [f"({line.strip()})" for line in stderr.splitlines() if line.strip()][-1:]
        raise ValueError(f"Cannot read video frames from {path}: {' '.join([head.strip().rstrip('.'), *cause])}. "
                         "Check that the file is a complete video.") from err


def select_frames(loaders, path, num_frames: int | None, stride: int, start: int) -> list:
    """Frames `start, start + stride, ...` of a lazy stream of frame loaders, each loaded only when chosen; the
    stream is not consumed past the last frame needed."""
    stop = None if num_frames is None else start + (num_frames - 1) * stride + 1
    read = itertools.count()  # zip draws from it after each loader it gets, so it ends on the number of loaders read
    frames = [load() for load, _ in itertools.islice(zip(loaders, read), start, stop, stride)]
    available = next(read)
    if available == 0:
        raise ValueError(f"{path} holds no video frames: give a video with frames in it.")
    if num_frames is None and not frames:
        raise ValueError(f"{path} has {available} frames, none at or after start={start}. Lower start.")
    if num_frames is not None and available < stop:
        fitting = max(0, (available - start - 1) // stride + 1)
        raise TooFewFramesError(
            f"{path} has {available} frames, but num_frames={num_frames} at stride={stride} from start={start} "
            f"needs {stop}. Lower num_frames or stride: at stride {stride}, {fitting} frames fit from start {start}.")
    return frames


def resize_frames(frames, height=None, width=None, resize_mode="crop", as_mask=False) -> list[Image.Image]:
    """Resize frames as `read_video` does: "crop" and "resize" with diffusers' VaeImageProcessor ("crop" and
    "default"), "pad" with Pillow's ImageOps.pad (diffusers' "fill" stretches the border pixels into the margin)."""
    from diffusers.image_processor import VaeImageProcessor

    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode={resize_mode!r} is not one of {RESIZE_MODES}.")
    if not frames:
        return []
    size = target_size(frames[0].size, height, width)
    if resize_mode == "pad":  # black margins, also "keep" in a mask
        method = Image.Resampling.NEAREST if as_mask else Image.Resampling.LANCZOS
        return [ImageOps.pad(frame, size, method=method, color=0) for frame in frames]
    processor = VaeImageProcessor(resample="nearest" if as_mask else "lanczos")
    mode = "crop" if resize_mode == "crop" else "default"
    return [processor.resize(frame, size[1], size[0], resize_mode=mode).convert(frame.mode) for frame in frames]


def target_size(source_size: tuple[int, int], height: int | None, width: int | None) -> tuple[int, int]:
    """(width, height) of resized frames: each given side rounded down to a multiple of 8 (at least 8), a missing
    side from the source aspect ratio (diffusers' would keep the source's), the source size when neither is given."""
    src_w, src_h = source_size
    for name, value in (("height", height), ("width", width)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be a positive number of pixels.")
    if height is None and width is None:
        return src_w, src_h
    height = height if height is not None else round(src_h * (width // 8 * 8 or 8) / src_w)
    width = width if width is not None else round(src_w * (height // 8 * 8 or 8) / src_h)
    return max(8, width // 8 * 8), max(8, height // 8 * 8)


def to_numpy_frames(frames) -> np.ndarray:
    """Frames as a uint8 array (F, H, W, 3), from a list of PIL images (any mode) or arrays, a numpy array
    (F, H, W, 3), (F, H, W, 1) or (F, H, W), or a torch tensor (F, 3, H, W) or (F, H, W, 3). uint8 data is taken as
    [0, 255], bool as black/white masks, float data as [0, 1] and clipped there (a decoder overshoots a little), but
    float data beyond [-0.5, 1.5] is refused: it is almost surely [0, 255] or [-1, 1] data, which clipping would
    silently turn into a blank video."""
    if type(frames).__module__.startswith("torch"):
        if frames.ndim != 4:
            raise ValueError(f"A torch video must be (F, 3, H, W) or (F, H, W, 3); got shape {tuple(frames.shape)}. "
                             "For a batch of videos pass one of them, e.g. video[0].")
        frames = frames.detach().cpu()
        frames = (frames.float() if frames.is_floating_point() else frames).numpy()  # numpy has no bfloat16
        frames = frames.transpose(0, 2, 3, 1) if frames.shape[1] in (1, 3) else frames
    elif isinstance(frames, (list, tuple)):
        frames = [np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f) for f in frames]
        for index, (height, width) in enumerate(frame.shape[:2] for frame in frames):
            if (height, width) != frames[0].shape[:2]:
                raise ValueError(f"Frame {index} is {width}x{height} but frame 0 is {frames[0].shape[1]}x"
                                 f"{frames[0].shape[0]}: all frames of a video must share one size.")
    array = np.asarray(frames)
    if len(array) == 0:
        raise ValueError("No frames: the video is empty.")
    if array.dtype.kind in "bf":  # float, and bool masks: [0, 1]
        low, high = float(array.min()), float(array.max())
        if low < -0.5 or high > 1.5:
            raise ValueError(f"Float frames must be in [0, 1]; these span [{low:.3g}, {high:.3g}]. "
                             "Divide [0, 255] data by 255, or map [-1, 1] data with (x + 1) / 2.")
        array = (np.clip(array, 0.0, 1.0) * 255.0).round()
    elif array.dtype.kind not in "ui" or array.min() < 0 or array.max() > 255:
        raise ValueError(f"Frames of dtype {array.dtype} are not supported: give uint8 or float in [0, 1].")
    array = array.astype(np.uint8)[..., None] if array.ndim == 3 else array.astype(np.uint8)
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"Expected frames shaped (F, H, W, 3), (F, H, W, 1) or (F, H, W); got {array.shape}. "
                         "Transpose channels-first numpy frames with array.transpose(0, 2, 3, 1).")
    return np.ascontiguousarray(np.broadcast_to(array, (*array.shape[:3], 3)))


def to_pil_frames(frames) -> list[Image.Image]:
    """Frames as a list of RGB PIL images; accepts everything `to_numpy_frames` does."""
    return [Image.fromarray(frame) for frame in to_numpy_frames(frames)]


@contextlib.contextmanager
def atomic_path(path: Path):
    """A fresh hidden name beside `path` (with its extension, which ffmpeg reads), renamed to `path` when the block
    succeeds and removed when it fails; not created (tempfile's would be private, mode 0600, after the rename too)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{os.urandom(4).hex()}.part{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def write_video(frames, path, fps: float) -> Path:
    """Write frames (anything `to_numpy_frames` accepts) to `path`, under a temporary name renamed when complete,
    and return it. The extension picks the format:

    - `.mp4`: H.264 in yuv420p; an odd width or height is padded by one replicated row or column, never rescaled.
    - `.gif`: looping forever, every frame kept (identical ones too, so the frame count survives a round trip),
      each delay a whole 1/100 s rounded so the running total keeps time (8 fps: 130 and 120 ms); at most 50 fps.
    - none: a folder of PNG frames `00000.png, 00001.png, ...` (no fps); an existing folder that holds anything is
      refused rather than replaced.
    """
    import imageio.v3 as iio

    path = Path(path)
    suffix = path.suffix.lower()
    if not fps > 0:
        raise ValueError(f"fps={fps} must be positive.")
    if suffix not in ("", ".mp4", ".gif"):
        raise ValueError(f"Cannot write {path}: use a .mp4 or .gif name, or a name without extension for a folder.")
    if suffix == ".gif" and fps > GIF_MAX_FPS:
        raise ValueError(f"fps={fps} is too fast for a GIF (at most {GIF_MAX_FPS:g}): write {path.stem}.mp4 instead.")
    if suffix == "" and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not an empty folder: write the frames to a new folder.")
    array = to_numpy_frames(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if suffix == ".mp4":  # yuv420p needs even sizes: pad an odd side by one replicated row or column
            array = np.pad(array, ((0, 0), (0, array.shape[1] % 2), (0, array.shape[2] % 2), (0, 0)), mode="edge")
            # imageio-ffmpeg maps quality q to x264's CRF as int((1 - q / 10) * 51): 8 gives CRF 10, visually lossless
            # for generated frames, which a later evaluation or a second pass reads back.
            iio.imwrite(tmp, array, plugin="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p", quality=8,
                        macro_block_size=1, ffmpeg_log_level="error", output_params=_SWS_FLAGS)
        elif suffix == ".gif":
            _write_gif(array, tmp, fps)
        else:
            tmp.mkdir()
            for index, frame in enumerate(array):
                Image.fromarray(frame).save(tmp / f"{index:05d}.png")
            if path.exists():
                path.rmdir()  # empty, checked above; a directory rename needs the target gone on some systems
    return path


def _write_gif(array: np.ndarray, path: Path, fps: float) -> None:
    # Pillow's save_all (and so imageio's GIF writers) merges identical consecutive frames into one, which would
    # change the frame count of a still or paused video; Pillow's frame-level GIF writers keep every frame.
    paletted = [Image.fromarray(frame).quantize(256) for frame in array]
    header, _ = GifImagePlugin.getheader(paletted[0], info={"loop": 0})
    with open(path, "xb") as file:
        file.writelines(header)
        for frame, delay_ms in zip(paletted, gif_delays_ms(len(array), fps)):
            file.writelines(GifImagePlugin.getdata(frame, duration=delay_ms, include_color_table=True))
        file.write(b";")  # GIF trailer


def gif_delays_ms(num_frames: int, fps: float) -> list[int]:
    """Per-frame GIF delays in ms, each a whole 1/100 s, rounded so the running total stays on frame_index / fps."""
    ends = [int((index + 1) * 100 / fps + 0.5) for index in range(num_frames)]  # halves up, not to even
    return [10 * (end - begin) for begin, end in zip([0] + ends[:-1], ends)]
