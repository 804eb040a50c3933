"""Deterministic DDIM inversion exactly as the original BIVDiff `reverse_step`.

It differs from diffusers' `DDIMInverseScheduler` in where the model is evaluated: here the UNet sees the
*current* (cleaner) timestep t and the sample moves to min(t + T // N, T - 2); `DDIMInverseScheduler` evaluates
at the target level. With SD-1.5's config (leading spacing, steps_offset 1) the timesteps are 1, 21, ..., 981 for
50 steps and the last step lands on 998.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


@dataclass
class BIVDiffDDIMInverseSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample (`torch.Tensor`):
            The sample at the next, noisier level. Named as in every diffusers scheduler output so a sampling
            loop can treat inversion and denoising alike.
        pred_original_sample (`torch.Tensor`):
            The clean sample predicted at the current level.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def _betas(config) -> torch.Tensor:
    if config.trained_betas is not None:
        return torch.tensor(config.trained_betas, dtype=torch.float32)
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    if config.beta_schedule == "scaled_linear":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
    raise NotImplementedError(
        f"beta_schedule {config.beta_schedule!r} is not supported by BIVDiffDDIMInverseScheduler"
    )


class BIVDiffDDIMInverseScheduler(SchedulerMixin, ConfigMixin):
    """
    DDIM inversion (eta = 0) with BIVDiff's step rule. Build it from any DDIM-style config:

    ```py
    >>> inverse_scheduler = BIVDiffDDIMInverseScheduler.from_config(pipe.scheduler.config)
    >>> inverse_scheduler.set_timesteps(50)
    >>> for t in inverse_scheduler.timesteps:  # ascending: 1, 21, ..., 981
    ...     eps = unet(z, t, encoder_hidden_states=cond).sample
    ...     z = inverse_scheduler.step(eps, t, z).prev_sample
    ```

    Keys it does not use (`clip_sample`, `set_alpha_to_one`, ...) are accepted so that `from_config` of a
    `DDIMScheduler` or `PNDMScheduler` config keeps the betas, offset and spacing that matter.
    """

    _compatibles = ["DDIMScheduler", "DDIMInverseScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        steps_offset: int = 1,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        clip_sample: bool = False,
        set_alpha_to_one: bool = False,
    ):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
        if timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing must be leading, trailing or linspace, got {timestep_spacing!r}")
        self.betas = _betas(self.config)
        # Kept in fp32 whatever the model dtype: the original cast these to fp16, which shifts every step.
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._next_levels: dict[int, int] = {}
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """The timesteps `DDIMScheduler` would denoise over, in ascending order, and the level each step moves to.

        Leading spacing (SD-1.5's) is the original's: step i moves from t_i to t_{i+1}, the last to
        min(t + T // N, T - 2). Trailing and linspace spacings, whose denoising starts at T - 1, invert from level
        0 up to T - 1 through the same grid. Every step moves to a strictly noisier level; a grid too fine for that
        (N close to T) loses its repeated levels, so it has fewer than N steps.
        """
        T = self.config.num_train_timesteps
        if not 0 < num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        spacing = self.config.timestep_spacing
        if spacing == "leading":
            ratio = T // num_inference_steps
            grid = np.arange(num_inference_steps) * ratio + self.config.steps_offset
            levels = np.append(grid, grid[-1] + ratio)
        elif spacing == "trailing":
            # T - i * T / N rather than np.arange(T, 0, -T / N), whose float steps can add a level below 0.
            levels = np.append(0, np.round(T - np.arange(num_inference_steps)[::-1] * T / num_inference_steps) - 1)
        else:
            levels = np.linspace(0, T - 1, num_inference_steps + 1).round()
        # The original stops at T - 2: alphas_cumprod[T - 1] is the one level it never reaches.
        top = T - 2 if spacing == "leading" else T - 1
        levels = np.unique(np.minimum(levels, top).astype(np.int64))
        self._next_levels = dict(zip(levels[:-1].tolist(), levels[1:].tolist()))
        self.timesteps = torch.from_numpy(levels[:-1]).to(device)

    def next_timestep(self, timestep: int) -> int:
        """The noisier level a step from `timestep` moves to."""
        t = int(timestep)
        if t in self._next_levels:
            return self._next_levels[t]
        T = self.config.num_train_timesteps
        return min(t + T // self.num_inference_steps, T - 1)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> BIVDiffDDIMInverseSchedulerOutput | tuple:
        """Move `sample` from `timestep` to the next, noisier level, given the model output at `timestep`."""
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        t = int(timestep)
        a_t = self.alphas_cumprod[t].to(torch.float32)
        a_next = self.alphas_cumprod[self.next_timestep(t)].to(torch.float32)
        z = sample.to(torch.float32)
        out = model_output.to(torch.float32)

        if self.config.prediction_type == "epsilon":
            eps = out
            x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        elif self.config.prediction_type == "v_prediction":
            x0 = a_t.sqrt() * z - (1 - a_t).sqrt() * out
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * z
        else:
            x0 = out
            eps = (z - a_t.sqrt() * x0) / (1 - a_t).sqrt()

        z_next = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        z_next, x0 = z_next.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return (z_next, x0)
        return BIVDiffDDIMInverseSchedulerOutput(prev_sample=z_next, pred_original_sample=x0)

    def __len__(self):
        return self.config.num_train_timesteps
