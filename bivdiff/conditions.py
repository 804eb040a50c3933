"""Per-frame inputs of the image models: condition videos (canny, depth, pose) and masks (inpainting, outpainting).
Canny needs OpenCV alone; depth (MiDaS) and pose (OpenPose, body only) need the optional extra `controlnet_aux`
(`pip install "bivdiff[annotators]"`) and its weights (lllyasviel/Annotators), or a ready condition video instead."""

import numpy as np
from PIL import Image

from bivdiff.errors import UserError

# Files each controlnet_aux detector reads from lllyasviel/Annotators.
ANNOTATOR_FILES = {"depth_midas": ("dpt_hybrid-midas-501f0c75.pt",),
                   "openpose": ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")}
INSTALL_ANNOTATORS = 'pip install "bivdiff[annotators]"'


def needs_annotator(condition: str) -> bool:
    return condition in ANNOTATOR_FILES


def condition_channels(idm: str, condition: str) -> int:
    """T2I-Adapter's canny model takes a 1-channel edge map (as the original fed it); every other condition is RGB."""
    return 1 if idm == "T2IAdapter" and condition == "canny" else 3


def canny_frames(frames: list[Image.Image], low: float = 100, high: float = 200, channels: int = 3) -> list:
    """Canny edges of each frame (OpenCV, thresholds `low`/`high` as in ControlNet's annotator): white on black."""
    import cv2

    edges = [cv2.Canny(np.asarray(frame.convert("RGB")), low, high) for frame in frames]
    return [Image.fromarray(e).convert("L" if channels == 1 else "RGB") for e in edges]


def check_annotators_installed(condition: str, dotted_key: str) -> None:
    """Raise a UserError saying how to get the annotator of `condition`, unless controlnet_aux imports."""
    try:
        if needs_annotator(condition):
            import controlnet_aux  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a broken torchvision raises RuntimeError, not ImportError
        raise UserError(f"{dotted_key}={condition} needs the controlnet_aux annotators, which cannot be imported "
                        f"here ({type(err).__name__}: {err}). Install them with: {INSTALL_ANNOTATORS}\nOr use "
                        f"{dotted_key}=canny (OpenCV only), or give a ready condition video with "
                        f"{dotted_key.rsplit('.', 1)[0]}.condition_video=PATH.") from err


def annotate_frames(frames: list[Image.Image], condition: str, annotator_path: str, channels: int = 3) -> list:
    """Depth (`depth_midas`) or pose (`openpose`, body only) of each frame at the frame's size, by the annotator
    weights in `annotator_path` (a local folder or a Hub id)."""
    import controlnet_aux
    from tqdm.auto import tqdm

    detector_class = {"depth_midas": "MidasDetector", "openpose": "OpenposeDetector"}[condition]
    detector = getattr(controlnet_aux, detector_class).from_pretrained(annotator_path)
    size = frames[0].size
    mode = "L" if channels == 1 else "RGB"
    body_only = dict(include_body=True, include_hand=False, include_face=False) if condition == "openpose" else {}
    kwargs = dict(detect_resolution=min(size), image_resolution=min(size), output_type="pil", **body_only)
    bar = tqdm(frames, desc=f"Conditions ({condition})")
    return [detector(f.convert("RGB"), **kwargs).resize(size, Image.Resampling.BILINEAR).convert(mode) for f in bar]


def binarise_masks(frames: list[Image.Image]) -> list[Image.Image]:
    """Grey mask frames -> pure black and white at mid-grey, so video compression noise cannot leak in."""
    return [frame.convert("L").point(lambda value: 255 if value >= 128 else 0) for frame in frames]


def outpainting_masks(num_frames: int, height: int, width: int, mask_type: str) -> list[Image.Image]:
    """The inpainting pipeline's band masks for `outpaint=mask_type` (white = regenerate), shown beside the result."""
    from bivdiff.pipelines.pipeline_bivdiff_inpaint import outpaint_mask

    mask = (outpaint_mask(height, width, mask_type) * 255).astype(np.uint8)
    return [Image.fromarray(mask) for _ in range(num_frames)]
