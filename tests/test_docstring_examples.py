"""Every pipeline's `__call__` example runs as written, on tiny random models saved under the Hub ids it names, in
both ways of loading a pipeline: from the installed package, and as a diffusers community pipeline from its file
(the example's `from bivdiff import ...` line then becomes what a user of the file alone writes)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import PIL.Image
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
)
from diffusers.utils import get_class_from_dynamic_module
from pipeline_helpers import control_video

import bivdiff
from bivdiff.tiny_models import tiny_controlnet, tiny_image_components, tiny_video_components

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
FILES = {
    "BIVDiffPipeline": "pipeline_bivdiff.py",
    "BIVDiffControllablePipeline": "pipeline_bivdiff_controllable.py",
    "BIVDiffInpaintPipeline": "pipeline_bivdiff_inpaint.py",
    "BIVDiffInstructPix2PixPipeline": "pipeline_bivdiff_instruct_pix2pix.py",
    "BIVDiffPrompt2PromptPipeline": "pipeline_bivdiff_prompt2prompt.py",
}
SIZE = 16  # stands for the examples' 512
# Stands for the default 50 steps: what the examples show is the API, and 50 steps made them a fifth of the suite.
STEPS = 4


def save_image_pipeline(folder: Path, pipeline_class, unet_in_channels: int = 4):
    image = tiny_image_components(0, unet_in_channels)
    image.pop("inverse_scheduler")
    pipe = pipeline_class(**image, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def save_video_model(folder: Path):
    video = tiny_video_components(1)
    for name in ("unet", "text_encoder", "tokenizer"):
        video[f"video_{name}"].save_pretrained(folder / name)


HUB = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": functools.partial(
        save_image_pipeline, pipeline_class=StableDiffusionPipeline
    ),
    "stable-diffusion-v1-5/stable-diffusion-inpainting": functools.partial(
        save_image_pipeline, pipeline_class=StableDiffusionInpaintPipeline, unet_in_channels=9
    ),
    "timbrooks/instruct-pix2pix": functools.partial(
        save_image_pipeline, pipeline_class=StableDiffusionInstructPix2PixPipeline, unet_in_channels=8
    ),
    "lllyasviel/control_v11p_sd15_canny": lambda folder: tiny_controlnet().save_pretrained(folder),
    "cerspense/zeroscope_v2_576w": save_video_model,
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hub")
    for repo, save in HUB.items():
        save(root / repo)
    return {repo: str(root / repo) for repo in HUB}


def example_code(pipeline_class) -> str:
    """The Python in the "Examples:" block of a `__call__` docstring, without its doctest prompts."""
    block = re.search(r"```py\n(.*?)```", pipeline_class.__call__.__doc__, re.S).group(1)
    return "\n".join(re.sub(r"^\s*(>>> |\.\.\. |>>>$|\.\.\.$)", "", line) for line in block.splitlines())


def on_tiny_models(code: str, hub: dict[str, str]) -> str:
    """The example on this machine: the tiny folders for the Hub ids, the CPU, float32, 16-pixel frames, 4 steps per
    call. The sizes are replaced first, so a folder path holding the number (a `pytest-512` temporary folder) is left
    as it is."""
    assert '"cuda"' in code and "torch.float16" in code and "num_inference_steps" not in code
    code = code.replace('"cuda"', '"cpu"').replace("torch.float16", "torch.float32")
    code = re.sub(r"\b512\b", str(SIZE), code)
    code, calls = re.subn(r"\bpipe\(", f"pipe(num_inference_steps={STEPS}, ", code)
    assert calls, "the example calls no `pipe(...)`"
    for repo, folder in hub.items():
        code = code.replace(f'"{repo}"', repr(folder))
    return code


def fake_load_video(path: str) -> list[PIL.Image.Image]:
    """Eight frames the examples slice with `[::4][:8]` into two; a GIF of the user's frames gives all eight."""
    frames = control_video(num_frames=8, seed=len(path), size=SIZE)
    return [PIL.Image.fromarray((f * 255).astype("uint8")) for f in frames]


@pytest.mark.parametrize("mode", ["package", "community"])
@pytest.mark.parametrize("name", sorted(FILES))
def test_docstring_example_runs_as_written(name, mode, hub, tmp_path, monkeypatch, modules_cache):
    import diffusers.utils

    pipeline_class = getattr(bivdiff, name)
    code = on_tiny_models(example_code(pipeline_class), hub)
    namespace = {}
    if mode == "community":
        line = f"from bivdiff import {name}, load_video_model"
        assert line in code
        code = code.replace(line, "")
        # With only diffusers installed: the class through `custom_pipeline`, the helper from the file beside it.
        load = functools.partial(
            DiffusionPipeline.from_pretrained, custom_pipeline=str(PIPELINES / FILES[name]), trust_remote_code=True
        )
        namespace[name] = type(name, (), {"from_pretrained": staticmethod(load)})
        namespace["load_video_model"] = get_class_from_dynamic_module(
            str(PIPELINES), "mixed_inversion.py", class_name="load_video_model", trust_remote_code=True
        )
    monkeypatch.setattr(diffusers.utils, "load_video", fake_load_video)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, f"<{name} example>", "exec"), namespace)

    pipe = namespace["pipe"]
    assert type(pipe).__name__ == name
    assert type(pipe).__module__.startswith("bivdiff" if mode == "package" else "diffusers_modules")
    written = sorted(p.name for p in tmp_path.glob("*.mp4"))
    assert written == sorted(re.findall(r'export_to_video\([^,]+, "([^"]+)"', code))
    assert all(p.stat().st_size > 0 for p in tmp_path.glob("*.mp4"))
