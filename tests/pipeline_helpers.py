"""Shared builders for pipeline tests: tiny components, counting hooks."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from bivdiff.tiny_models import tiny_image_components, tiny_video_components

HEIGHT = WIDTH = 32
NUM_FRAMES = 3


def bivdiff_components(**overrides) -> dict:
    components = {**tiny_image_components(), **tiny_video_components()}
    components.update(overrides)
    return components


def control_video(num_frames: int = NUM_FRAMES, seed: int = 0, size: int = HEIGHT) -> np.ndarray:
    return np.random.default_rng(seed).random((num_frames, size, size, 3)).astype(np.float32)


def generators(num_frames: int = NUM_FRAMES, base: int = 0) -> list[list[torch.Generator]]:
    """Per-frame generators of one video, seeded base, base + 1, ...: `generator=` in its list-of-lists form."""
    return [[torch.Generator().manual_seed(base + i) for i in range(num_frames)]]


def stage1(pipe, **call_kwargs) -> torch.Tensor:
    """Stage 1's clean latents (B, 4, F, h, w) of a call, read through the public API (`idm_frames` of a latent
    output); the inversion is cut to one video-branch step because only stage 1 is looked at."""
    return pipe(**{**call_kwargs, "mixing_ratio": 0.0, "num_inversion_steps": 1, "output_type": "latent"}).idm_frames


@contextlib.contextmanager
def count_forward_calls(**modules: torch.nn.Module):
    """Counts forward calls of each named module (top level only)."""
    counts = {name: 0 for name in modules}
    handles = []
    for name, module in modules.items():
        if module is None:
            continue

        def hook(_module, _args, _name=name):
            counts[_name] += 1

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def all_models(pipe) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def pipeline_file(name: str) -> str:
    """Absolute path of a pipeline file, for `custom_pipeline=` whatever the working directory."""
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1] / "pipelines" / name)
