"""The folder each run writes: a new `<output_root>/<config>-<timestamp>/` (never an earlier run's), holding every
video as MP4 and GIF, a labelled side-by-side comparison, the resolved config and the run's statistics.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from bivdiff.video_io import to_numpy_frames, write_video

# GIF frame delays are whole 1/100 s and browsers slow down anything faster than 50 fps.
GIF_MAX_FPS = 50.0
# Comparison tiles are enlarged (nearest neighbour) to at least this width so their labels stay readable.
MIN_TILE_WIDTH = 256
LABEL_BAR = 0.11  # label bar height, as a fraction of the tile width


def new_run_folder(output_root: str | os.PathLike, config_name: str, now: datetime | None = None) -> Path:
    """Create and return a new folder `<config>-<YYYYmmdd-HHMMSS>` under `output_root`.

    `os.mkdir` fails if the name exists, so two runs (even in the same second, even in two processes) never share
    a folder: the second takes the next free `-1`, `-2`, ... suffix.
    """
    root = Path(output_root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    base = f"{config_name}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"
    for index in itertools.count():
        folder = root / (base if index == 0 else f"{base}-{index}")
        try:
            os.mkdir(folder)
            return folder
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def write_clip(folder: Path, stem: str, frames, fps: float) -> list[str]:
    """`stem.mp4` and `stem.gif` (GIF fps capped at 50); returns the file names."""
    write_video(frames, folder / f"{stem}.mp4", fps=fps)
    write_video(frames, folder / f"{stem}.gif", fps=min(fps, GIF_MAX_FPS))
    return [f"{stem}.mp4", f"{stem}.gif"]


def write_text(path: Path, text: str) -> None:
    """Write through a temporary name and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Side-by-side comparison


def comparison_frames(columns: list[tuple[str, list]]) -> np.ndarray:
    """(F, H', W', 3) uint8: the videos of `columns` side by side, each under a bar with its label.

    Every column is brought to the last column's size (the result), then enlarged so a tile is at least
    MIN_TILE_WIDTH wide.
    """
    videos = [(label, to_numpy_frames(frames)) for label, frames in columns]
    num_frames = min(len(video) for _, video in videos)
    height, width = videos[-1][1].shape[1:3]
    scale = max(1, -(-MIN_TILE_WIDTH // width))
    tile_h, tile_w = height * scale, width * scale
    bar = max(16, int(tile_w * LABEL_BAR))
    out = np.zeros((num_frames, bar + tile_h, tile_w * len(videos), 3), dtype=np.uint8)
    for column, (label, video) in enumerate(videos):
        left = column * tile_w
        out[:, :bar, left : left + tile_w] = _label_bar(label, tile_w, bar)
        for index in range(num_frames):
            out[index, bar:, left : left + tile_w] = _fit(video[index], tile_w, tile_h)
    return out


def _fit(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    if frame.shape[:2] == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.NEAREST))


def _label_bar(label: str, width: int, height: int) -> np.ndarray:
    """White text on dark grey, shrunk until it fits the tile."""
    import cv2

    bar = np.full((height, width, 3), 32, dtype=np.uint8)
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, 1
    scale = height / 40
    while scale > 0.25:
        (text_w, text_h), _ = cv2.getTextSize(label, font, scale, thickness)
        if text_w <= width - 8:
            break
        scale -= 0.05
    (text_w, text_h), _ = cv2.getTextSize(label, font, scale, thickness)
    origin = (max(4, (width - text_w) // 2), (height + text_h) // 2)
    cv2.putText(bar, label, origin, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return bar
