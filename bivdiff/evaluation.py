"""Metrics for generated videos: weights-free temporal consistency, plus CLIP scores from a local CLIP folder.

Pixel metrics (`warp_error`, `frame_difference`) are mean absolute differences in [0, 1] intensity units, so
0.01 is about 2.5 grey levels; multiply by 1000 to compare with tables that report them "x 10^-3". CLIP
scores are 100 x cosine similarity, in [-100, 100]. Every function takes frames in any form
`bivdiff.video_io.to_numpy_frames` accepts (PIL list, numpy array, torch tensor), measured at 8 bits per channel
as a saved video would be; `evaluate_video` also takes paths.
"""

import functools
import itertools
import os
from pathlib import Path

import numpy as np

from bivdiff.video_io import read_video, to_numpy_frames, to_pil_frames

# OpenCV's documented Farneback settings: 3-level pyramid halving each level, 15 px window, 3 iterations,
# 5-pixel polynomial neighbourhood with sigma 1.2.
_FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


def frame_difference(frames) -> float:
    """Mean absolute difference of consecutive frames, in [0, 1] intensity units.

    A crude flicker measure with no motion model: it also grows with honest motion, so compare it only between
    videos of the same content (say, frame-wise IDM output against the smoothed video).
    """
    video = _float_frames(frames, "frame_difference")
    return float(np.mean([np.abs(b - a).mean() for a, b in itertools.pairwise(video)]))


def warp_error(frames, source=None) -> float:
    """Temporal consistency by warping, in [0, 1] intensity units (0 = every frame is its predecessor moved).

    For each consecutive pair (t, t+1): optical flow t -> t+1 and t+1 -> t (OpenCV Farneback), frame t+1 warped
    back onto frame t along the forward flow, and the absolute difference to frame t averaged over the pixels
    that are not occluded. The flow comes from `source` when given (the video the output was made from, whose
    motion the output should follow, as in video editing), else from the output frames themselves; `source`
    must have the output's frame count and size.

    Occlusions follow Ruder et al. (2016): a pixel counts when its forward flow and the backward flow at its
    destination cancel, |f + b|^2 < 0.01 (|f|^2 + |b|^2) + 0.5, and its destination lies inside the frame.
    Pairs with no such pixel are skipped; NaN when every pair is.
    """
    import cv2

    video = _float_frames(frames, "warp_error")
    motion = video if source is None else _float_frames(source, "warp_error")
    if motion.shape != video.shape:
        raise ValueError(
            f"warp_error's source is {len(motion)} frames of {motion.shape[2]}x{motion.shape[1]} but the video is "
            f"{len(video)} frames of {video.shape[2]}x{video.shape[1]}: pass the source frames the video was made "
            "from, read at its size, e.g. read_video(path, num_frames=F, stride=s, height=H, width=W)."
        )
    gray = [cv2.cvtColor((frame * 255.0).round().astype(np.uint8), cv2.COLOR_RGB2GRAY) for frame in motion]
    errors = []
    for t in range(len(video) - 1):
        # Dense flows (H, W, 2) with first(x) ~ second(x + flow(x)).
        forward = cv2.calcOpticalFlowFarneback(gray[t], gray[t + 1], None, **_FARNEBACK)
        backward = cv2.calcOpticalFlowFarneback(gray[t + 1], gray[t], None, **_FARNEBACK)
        warped, inside = _warp(video[t + 1], forward)
        valid = inside & _consistent(forward, backward)
        if valid.any():
            errors.append(np.abs(video[t] - warped)[valid].mean())
    return float(np.mean(errors)) if errors else float("nan")


def _float_frames(frames, metric: str) -> np.ndarray:
    video = to_numpy_frames(frames).astype(np.float32) / 255.0
    if len(video) < 2:
        raise ValueError(f"{metric} compares consecutive frames and needs at least 2; got {len(video)}.")
    return video


def _warp(image: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """image sampled at x + flow(x) (bilinear), and where that point lies inside the image."""
    import cv2

    height, width = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    map_x, map_y = grid_x + flow[..., 0], grid_y + flow[..., 1]
    warped = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    inside = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
    return warped, inside


def _consistent(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    backward_at_target, _ = _warp(backward, forward)
    mismatch = np.square(forward + backward_at_target).sum(-1)
    scale = np.square(forward).sum(-1) + np.square(backward_at_target).sum(-1)
    return mismatch < 0.01 * scale + 0.5


def clip_scores(frames, prompt: str | None = None, *, clip_path: str | os.PathLike, batch_size: int = 16) -> dict:
    """CLIP scores of a video, 100 x cosine similarity of projected embeddings, in [-100, 100]:

    - `clip_frame_consistency`: mean over consecutive frame pairs of their image embeddings' cosine (100 for
      identical frames); needs at least 2 frames.
    - `clip_text_alignment` (when `prompt` is given): mean over frames of the cosine between the frame's image
      embedding and the prompt's text embedding.

    `clip_path` is a local folder holding a transformers `CLIPModel` with its tokenizer and its
    `preprocessor_config.json`, e.g. a download of openai/clip-vit-large-patch14; nothing is downloaded. The
    last model loaded stays in memory, so scoring many videos loads it once.
    """
    import torch

    pil_frames = to_pil_frames(frames)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, processor = _load_clip(str(Path(clip_path).resolve()), device)
    embeddings = []
    # The towers and projections directly: get_image_features' return type differs across transformers versions
    # (a tensor in 4.x, a model output in 5.x).
    with torch.no_grad():
        for begin in range(0, len(pil_frames), batch_size):
            pixels = processor(images=pil_frames[begin : begin + batch_size], return_tensors="pt")["pixel_values"]
            pooled = model.vision_model(pixel_values=pixels.to(device, torch.float32)).pooler_output
            embeddings.append(model.visual_projection(pooled))
    images = torch.nn.functional.normalize(torch.cat(embeddings).float(), dim=-1).cpu()
    scores = {}
    if len(images) > 1:
        scores["clip_frame_consistency"] = 100.0 * float((images[:-1] * images[1:]).sum(-1).mean())
    if prompt is not None:
        max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
        tokens = tokenizer([prompt], truncation=True, max_length=max_length, return_tensors="pt").to(device)
        with torch.no_grad():
            pooled = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            text = torch.nn.functional.normalize(model.text_projection(pooled.pooler_output).float(), dim=-1)
        scores["clip_text_alignment"] = 100.0 * float((images @ text.cpu()[0]).mean())
    if not scores:
        raise ValueError("clip_scores got 1 frame and no prompt: give a prompt, or at least 2 frames.")
    return scores


@functools.lru_cache(maxsize=1)
def _load_clip(path: str, device: str) -> tuple:
    """The folder's CLIPModel, tokenizer and image processor. The processor runs on its PIL backend, preferred over
    transformers' torchvision one so a score does not depend on whether torchvision is installed."""
    from transformers import AutoTokenizer, CLIPModel

    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers 5
    except ImportError:
        from transformers import CLIPImageProcessor as Processor  # transformers 4: PIL-based already
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"No CLIP folder at {path}: give clip_path a local folder holding a CLIPModel, its tokenizer and "
            "preprocessor_config.json (e.g. a download of openai/clip-vit-large-patch14)."
        )
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        processor = Processor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot load a CLIPModel, its tokenizer and image processor from {path}: {err}") from err
    return model, tokenizer, processor


def evaluate_video(video, source=None, prompt: str | None = None, clip_path: str | os.PathLike | None = None) -> dict:
    """All metrics of one video as a JSON-serialisable dict.

    `video` and `source` are frames or paths (read whole, at their own size). Keys: `num_frames`, `height`,
    `width`, `frame_difference`, `warp_error` (both [0, 1] intensity units), `warp_flow` ("source" or "output":
    whose motion the warp followed), and with `clip_path` the `clip_scores` keys (`clip_text_alignment` only
    when `prompt` is given). Without `clip_path` the prompt is unused.
    """
    frames = to_numpy_frames(_frames_of(video))
    source_frames = None if source is None else to_numpy_frames(_frames_of(source))
    results = dict(zip(("num_frames", "height", "width"), map(int, frames.shape[:3])))
    results.update(frame_difference=frame_difference(frames), warp_error=warp_error(frames, source_frames),
                   warp_flow="output" if source is None else "source")
    if clip_path is not None:
        results.update(clip_scores(frames, prompt, clip_path=clip_path))
    return results


def _frames_of(video):
    return read_video(video) if isinstance(video, (str, os.PathLike)) else video
