"""Shared helpers for the command-line tests: calling `bivdiff.cli.main` and reading a run folder."""

from __future__ import annotations

import json
from pathlib import Path

from bivdiff.cli import main

# Small enough to keep a tiny run to seconds on two CPU cores.
FAST = ["Model.width=32", "Model.height=32", "Model.video_length=3", "Model.num_inference_steps=2"]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def only_run_folder(output_root: Path) -> Path:
    folders = [p for p in Path(output_root).iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def stats(folder: Path) -> dict:
    return json.loads((folder / "stats.json").read_text())


def save_tiny_checkpoints(root: Path) -> Path:
    """The original checkpoints/ layout for ControlNet (canny) + ZeroScope, filled with tiny models."""
    import shutil

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor

    from bivdiff.tiny_models import tiny_controlnet, tiny_image_components, tiny_video_components

    # Saved as the SD-1.5 repo is laid out: its model_index.json lists the components, a feature extractor among
    # them, whose folder is left out as by the files the command line fetches.
    components = tiny_image_components()
    del components["inverse_scheduler"]
    feature_extractor = CLIPImageProcessor(size=224, crop_size=224)
    StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=feature_extractor, requires_safety_checker=False
    ).save_pretrained(root / "stable-diffusion-v1-5")
    shutil.rmtree(root / "stable-diffusion-v1-5" / "feature_extractor")
    tiny_controlnet().save_pretrained(root / "ControlNet" / "control_v11p_sd15_canny")
    zeroscope = root / "ZeroScope" / "zeroscope_v2_576w"
    video = tiny_video_components()
    parts = (("unet", "video_unet"), ("text_encoder", "video_text_encoder"), ("tokenizer", "video_tokenizer"))
    for folder, name in parts:
        video[name].save_pretrained(zeroscope / folder)
    return root
