"""Synthetic clips with known motion for the temporal-consistency metrics."""

from __future__ import annotations

import cv2
import numpy as np

NUM_FRAMES, HEIGHT, WIDTH, STEP = 6, 64, 96, 2


def texture(height=NUM_FRAMES * STEP + 100, width=NUM_FRAMES * STEP + 140, seed=0):
    """Smooth random colour texture in [0, 1]: enough detail for optical flow, no aliasing when shifted."""
    noise = np.random.default_rng(seed).random((height, width, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 3) * 4 - 1.5, 0, 1)


def static_video():
    return np.stack([texture()[:HEIGHT, :WIDTH]] * NUM_FRAMES)


def translating_video():
    """A window sliding STEP px right per frame over a texture: content moves STEP px left."""
    image = texture()
    return np.stack([image[10 : 10 + HEIGHT, 20 + STEP * t : 20 + STEP * t + WIDTH] for t in range(NUM_FRAMES)])


def flicker(video, seed=1):
    """The video with a random brightness gain per frame."""
    gains = np.random.default_rng(seed).uniform(0.7, 1.3, len(video)).astype(np.float32)
    return np.clip(video * gains[:, None, None, None], 0, 1)
