"""The folder each run writes, a new `<output_root>/<config>-<timestamp>/` (never an earlier run's) renamed from a
hidden staging name when complete: every video as MP4 and GIF, a labelled side-by-side comparison, the resolved
config and the run's statistics."""

import errno
import itertools
import json
import os
import secrets
import shutil
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
    """A new hidden folder `.<name>-<YYYYmmdd-HHMMSS>.partial-XXXXXXXX` under `output_root` to write a run into, named
    by `publish_run_folder` once complete: a process killed mid-run leaves no folder that looks like a run."""
    root = Path(output_root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp, whose folder is private (0700): a run folder is as readable as any other.
    folder = root / f".{name}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}{STAGING}{secrets.token_hex(4)}"
    folder.mkdir()
    return folder


def publish_run_folder(staging: Path) -> Path:
    """Rename a staging folder to `<name>-<timestamp>`, or the next free `-1`, `-2`, ... suffix. A rename onto an
    existing run folder (never empty) fails, so two runs, even in two processes in one second, never share one."""
    base = staging.name[1:].rsplit(STAGING, 1)[0]
    for folder in (staging.with_name(f"{base}-{index}" if index else base) for index in itertools.count()):
        try:
            if not folder.exists():
                return staging.rename(folder)
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
    batches = [getattr(result, name, None) for name in ("source_frames", "idm_frames", "frames")]
    reconstructed, by_idm, by_bivdiff = (None if batch is None else list(batch[0]) for batch in batches)
    videos = [video for video in [
        ("source_video", "source", inputs.source),
        (f"{inputs.condition_name}_condition", inputs.condition_label or "condition", inputs.condition),
        ("source_mask", inputs.condition_label or "mask", inputs.mask),
        ("video_inverted_and_reconstructed", None, reconstructed),
        ("video_by_idm", f"image model: {config.idm}{noise}", by_idm),
        ("video_by_bivdiff", f"BIVDiff: {config.vdm}{noise}", by_bivdiff),
    ] if video[2] is not None]
    videos.append(("comparison", None, comparison_frames([(label, v) for _, label, v in videos if label])))
    for stem, _, frames in videos:
        write_video(frames, folder / f"{stem}.mp4", fps=fps)
        write_video(frames, folder / f"{stem}.gif", fps=min(fps, GIF_MAX_FPS))
    files = {stem: [f"{stem}.mp4", f"{stem}.gif"] for stem, _, _ in videos}
    return {**files, "config": ["config.yaml"], "stats": ["stats.json"]}


def comparison_frames(columns: list[tuple[str, list]]) -> np.ndarray:
    """(F, H', W', 3) uint8: the videos of `columns` side by side, each under a dark grey bar with its label in white,
    shrunk until it fits. Every column is brought to the last column's size (the result), then enlarged so a tile is
    at least MIN_TILE_WIDTH wide."""
    import cv2

    videos = [(label, to_numpy_frames(frames)) for label, frames in columns]
    num_frames = min(len(video) for _, video in videos)
    height, width = videos[-1][1].shape[1:3]
    tile_w, tile_h = (size * max(1, -(-MIN_TILE_WIDTH // width)) for size in (width, height))
    bar, font = max(16, int(tile_w * LABEL_BAR)), cv2.FONT_HERSHEY_SIMPLEX
    out = np.zeros((num_frames, bar + tile_h, tile_w * len(videos), 3), dtype=np.uint8)
    for column, (label, video) in enumerate(videos):
        tile = out[:, :, column * tile_w : (column + 1) * tile_w]
        tile[:, bar:] = [np.asarray(Image.fromarray(frame).resize((tile_w, tile_h), Image.Resampling.NEAREST))
                         for frame in video[:num_frames]]
        scale = bar / 40
        while scale > 0.25 and cv2.getTextSize(label, font, scale, 1)[0][0] > tile_w - 8:
            scale -= 0.05
        (text_w, text_h), _ = cv2.getTextSize(label, font, scale, 1)
        label_bar = np.full((bar, tile_w, 3), 32, dtype=np.uint8)  # drawn apart: a long label is cut at the tile
        cv2.putText(label_bar, label, (max(4, (tile_w - text_w) // 2), (bar + text_h) // 2), font, scale,
                    (255, 255, 255), 1, cv2.LINE_AA)
        tile[:, :bar] = label_bar
    return out
