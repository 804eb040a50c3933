"""The folder each run writes: a new `<output_root>/<config>-<timestamp>/` (never an earlier run's), holding every
video as MP4 and GIF, a labelled side-by-side comparison, the resolved config and the run's statistics. It is
written under a hidden staging name and renamed when complete.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from bivdiff.video_io import GIF_MAX_FPS, atomic_path, to_numpy_frames, write_video

# Comparison tiles are enlarged (nearest neighbour) to at least this width so their labels stay readable.
MIN_TILE_WIDTH = 256
LABEL_BAR = 0.11  # label bar height, as a fraction of the tile width
STAGING = ".partial-"


def staging_folder(output_root: str | os.PathLike, name: str, now: datetime | None = None) -> Path:
    """A new hidden folder `.<name>-<YYYYmmdd-HHMMSS>.partial-XXXXXXXX` under `output_root` to write a run into;
    `publish_run_folder` gives it its final name once complete, so a process killed mid-run leaves no folder that
    looks like a run."""
    root = Path(output_root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    base = f"{name}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"
    # mkdtemp makes the folder private (0700); a run folder is as readable as any other.
    folder = Path(tempfile.mkdtemp(prefix=f".{base}{STAGING}", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    return folder


def publish_run_folder(staging: Path) -> Path:
    """Rename a staging folder to `<name>-<timestamp>`, or the next free `-1`, `-2`, ... suffix.

    A rename onto an existing run folder (never empty) fails, so two runs, even in two processes in the same
    second, never share a folder.
    """
    base = staging.name[1:].rsplit(STAGING, 1)[0]
    for folder in (staging.with_name(f"{base}-{index}" if index else base) for index in itertools.count()):
        try:
            if not folder.exists():
                os.rename(staging, folder)
                return folder
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise


def remove_staging_folders(output_root: Path) -> list[Path]:
    """Delete the staging folders of runs that were killed; only safe while no run writes under `output_root`."""
    stale = [p for p in Path(output_root).glob(f".*{STAGING}*") if p.is_dir()]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def write_text(path: Path, text: str) -> None:
    """Write through a temporary name and rename, so a crash never leaves a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_outputs(folder: Path, plan, result) -> dict:
    """Every video as MP4 and GIF (GIF fps capped at 50), and the labelled comparison; returns {what: [files]}."""
    config, inputs, fps = plan.config, plan.inputs, plan.fps
    noise = " (tiny: noise)" if config.tiny else ""
    idm_frames, source_frames = getattr(result, "idm_frames", None), getattr(result, "source_frames", None)
    videos = [("source_video", "source", inputs.source)]
    if inputs.condition is not None:
        videos.append((f"{inputs.condition_name}_condition", inputs.condition_label or "condition", inputs.condition))
    if inputs.mask is not None:
        videos.append(("source_mask", inputs.condition_label or "mask", inputs.mask))
    if source_frames is not None:
        videos.append(("video_inverted_and_reconstructed", None, list(source_frames[0])))
    if idm_frames is not None:
        videos.append(("video_by_idm", f"image model: {config.idm}{noise}", list(idm_frames[0])))
    videos.append(("video_by_bivdiff", f"BIVDiff: {config.vdm}{noise}", list(result.frames[0])))
    videos.append(("comparison", None, comparison_frames([(label, v) for _, label, v in videos if label])))
    files = {}
    for stem, _, frames in videos:
        write_video(frames, folder / f"{stem}.mp4", fps=fps)
        write_video(frames, folder / f"{stem}.gif", fps=min(fps, GIF_MAX_FPS))
        files[stem] = [f"{stem}.mp4", f"{stem}.gif"]
    return {**files, "config": ["config.yaml"], "stats": ["stats.json"]}


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
            frame = Image.fromarray(video[index]).resize((tile_w, tile_h), Image.Resampling.NEAREST)
            out[index, bar:, left : left + tile_w] = np.asarray(frame)
    return out


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
