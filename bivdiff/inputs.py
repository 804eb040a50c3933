"""The videos a run reads (source, mask, ready condition video), all with the config's one frame selection, so
frame i of each is the same moment. Read before any model loads: a bad input fails in seconds, in config terms."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from bivdiff.config import RunConfig
from bivdiff.errors import ConfigError
from bivdiff.video_io import default_clip_path, default_mask_path, read_video_clip

# GIFs and image folders carry no frame rate of their own (a folder none at all): the original wrote 8 fps.
FALLBACK_FPS = 8.0


@dataclass(frozen=True)
class FrameSelection:
    """Frames `start, start + stride, ...` (`num_frames` of them), fitted to `width` x `height`."""

    num_frames: int
    stride: int
    start: int
    height: int
    width: int
    resize_mode: str

    @classmethod
    def from_config(cls, config: RunConfig) -> FrameSelection:
        model = config.model
        return cls(
            num_frames=model["video_length"],
            stride=model["frame_rate"],
            start=model["start_frame"],
            height=model["height"],
            width=model["width"],
            resize_mode=model["resize_mode"],
        )


@dataclass
class SourceVideo:
    frames: list[Image.Image]
    path: Path
    fps: float  # of the result: the source's frame rate divided by the stride
    source_fps: float | None
    shipped: bool  # the demo clip shipped with bivdiff


def read_frames(
    path: Path, selection: FrameSelection, dotted_key: str, as_mask: bool = False
) -> tuple[list[Image.Image], float | None]:
    """Frames and source fps of `path`; a video too short for the selection fails naming the keys to change."""
    try:
        clip = read_video_clip(
            path,
            num_frames=selection.num_frames,
            stride=selection.stride,
            start=selection.start,
            height=selection.height,
            width=selection.width,
            resize_mode=selection.resize_mode,
            as_mask=as_mask,
        )
    except FileNotFoundError as err:
        raise ConfigError(f"{dotted_key}: {err}") from err
    except ValueError as err:
        raise ConfigError(
            f"{dotted_key}: {err}\nIn config terms: Model.video_length={selection.num_frames} frames at "
            f"Model.frame_rate={selection.stride} (the frame stride) from Model.start_frame={selection.start} need "
            f"{selection.start + (selection.num_frames - 1) * selection.stride + 1} source frames. Lower one of them "
            "on the command line, e.g. Model.frame_rate=1, or give a longer video."
        ) from err
    return clip.frames, clip.fps


def read_source(config: RunConfig) -> SourceVideo:
    selection = FrameSelection.from_config(config)
    value = config.model["video_path"]
    path = default_clip_path() if value is None else Path(value).expanduser()
    frames, source_fps = read_frames(path, selection, "Model.video_path")
    fps = (source_fps or FALLBACK_FPS * selection.stride) / selection.stride
    return SourceVideo(frames=frames, path=path, fps=fps, source_fps=source_fps, shipped=value is None)


def mask_path(config: RunConfig) -> Path:
    value = config.idm_options["video_mask_path"]
    return default_mask_path() if value is None else Path(value).expanduser()


def read_mask(config: RunConfig) -> list[Image.Image]:
    """The inpainting mask video ("L" frames, white = regenerate; binarised by the caller)."""
    frames, _ = read_frames(
        mask_path(config), FrameSelection.from_config(config), f"IDM.{config.idm}.video_mask_path", as_mask=True
    )
    return frames


def read_condition_video(config: RunConfig, channels: int) -> list[Image.Image]:
    """A ready condition video (`condition_video`), read like the source; 1-channel conditions become grey."""
    path = Path(config.idm_options["condition_video"]).expanduser()
    frames, _ = read_frames(path, FrameSelection.from_config(config), f"IDM.{config.idm}.condition_video")
    return [f.convert("L" if channels == 1 else "RGB") for f in frames]
