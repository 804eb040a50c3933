"""The skeleton every BIVDiff pipeline shares: the call (prologue, prompts, stage 1's frame batches, Mixed
Inversion, temporal smoothing, decoding, output), the inversion step and the helpers around them.

This module is copied next to a pipeline file when diffusers loads it as a `custom_pipeline`, so it imports only
installed libraries (no relative imports) and defines no `DiffusionPipeline` subclass.

Layouts: a latent video is (B, C, F, h, w); an image UNet sees frames folded into the batch, (B * F, C, h, w),
video-major (all frames of video 0, then video 1, ...).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
    UNetMotionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.loaders import IPAdapterMixin, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero import (
    CrossFrameAttnProcessor2_0,
)
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.schedulers import DDIMScheduler, KarrasDiffusionSchedulers
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import unwrap_module
from diffusers.video_processor import VideoProcessor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

FrameInput = list[PIL.Image.Image] | np.ndarray | torch.Tensor
OUTPUT_TYPES = ("np", "pt", "pil", "latent")
RESIZE_MODES = ("default", "fill", "crop")


@dataclass
class BIVDiffPipelineOutput(BaseOutput):
    r"""
    Output of every BIVDiff pipeline.

    Args:
        frames (`np.ndarray`, `torch.Tensor` or `list[list[PIL.Image.Image]]`):
            The final, temporally smoothed videos; layouts as in diffusers' video pipelines: np `(B, F, H, W, 3)` in
            [0, 1], pt `(B, F, 3, H, W)` in [0, 1], pil a list (per video) of lists of frames, latent
            `(B, 4, F, h, w)`.
        idm_frames (same type as `frames`, or `None`):
            The frame-wise image-model result that was inverted (`None` when not asked for).
    """

    frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]]
    idm_frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]] | None = None


# ---------------------------------------------------------------------------------------------------- inversion step
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
    Deterministic DDIM inversion (eta = 0) exactly as the original BIVDiff `reverse_step`.

    It differs from diffusers' `DDIMInverseScheduler` in where the model is evaluated: here the UNet sees the
    *current* (cleaner) timestep t and the sample moves to the next timestep of the schedule; after the last one,
    to min(t + T // N, T - 2) (never below t). With SD-1.5's config (leading spacing, steps_offset 1) the
    timesteps are 1, 21, ..., 981 for 50 steps and the last step lands on 998. Build it from any DDIM-style config:

    ```py
    >>> inverse_scheduler = BIVDiffDDIMInverseScheduler.from_config(pipe.scheduler.config)
    >>> inverse_scheduler.set_timesteps(50)
    >>> for t in inverse_scheduler.timesteps:  # ascending: 1, 21, ..., 981
    ...     eps = unet(z, t, encoder_hidden_states=cond).sample
    ...     z = inverse_scheduler.step(eps, t, z).prev_sample
    ```

    Keys it does not use (`clip_sample`, `set_alpha_to_one`, ...) are accepted so that `from_config` of a
    `DDIMScheduler` or `PNDMScheduler` config keeps the betas, offset and spacing that matter. The pipelines build
    one from `scheduler.config` when no `inverse_scheduler` component is given, so this class lives beside them:
    a pipeline file loaded as a community pipeline brings it along.
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
        # Inversion walks towards noise, so its timesteps ascend from the start.
        self.timesteps = torch.arange(0, num_train_timesteps)

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


def strength_steps(num_steps: int, strength: float) -> int:
    """`int(num_steps * strength)`, the steps a `strength` keeps; the tolerance keeps float products such as
    3 * (1 / 3) = 0.99999... from losing a step."""
    return int(num_steps * strength + 1e-9)


def ddim_sampler(scheduler) -> DDIMScheduler:
    """A DDIM scheduler (eta 0) with `scheduler`'s betas, whatever sampler that is.

    `clip_sample` is always off: latents are not bounded to [-1, 1], and configs of other samplers (PNDM, Euler)
    often omit the key, which would turn on DDIM's default clipping. A missing `set_alpha_to_one` means SD's False
    (the last step lands on alphas_cumprod[0], as in the original); so does a value the config only holds as its
    class's default (listed in `_use_default_values`, which `from_config` would drop in favour of DDIM's True).
    """
    config = scheduler.config
    explicit = "set_alpha_to_one" in config and "set_alpha_to_one" not in config.get("_use_default_values", [])
    set_alpha_to_one = bool(config["set_alpha_to_one"]) if explicit else False
    return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=set_alpha_to_one)


# ---------------------------------------------------------------------------------------------------- layouts
def fold_frames(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, h, w) -> (B * F, C, h, w), video-major, frame order kept within each video."""
    b, c, f, h, w = latents.shape
    return latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def unfold_frames(latents: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B * F, C, h, w) -> (B, C, F, h, w); inverse of `fold_frames`."""
    bf, c, h, w = latents.shape
    return latents.reshape(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)


def frame_batches(num_videos: int, num_frames: int, size: int, anchored: bool = False) -> list[list[int]]:
    """The folded frame indices of each stage-1 call, `size` frames per call, in order. With `anchored` (cross-frame
    attention) a call holds whole videos, as many as fit, or part of one video too long for a call: then every call
    after its first starts again with its first frame, which the others attend to (computed again and dropped)."""
    total = num_videos * num_frames
    if not anchored or num_frames <= size:
        whole = size // num_frames * num_frames if anchored else size
        return [list(range(start, min(start + whole, total))) for start in range(0, total, whole)]
    batches, step = [], size - 1
    for first in range(0, total, num_frames):
        end = first + num_frames
        batches.append(list(range(first, first + size)))
        batches += [[first, *range(start, min(start + step, end))] for start in range(first + size, end, step)]
    return batches


class FirstFrameAttnProcessor(CrossFrameAttnProcessor2_0):
    """diffusers' Text2Video-Zero cross-frame attention (each frame's self-attention reads its clip's first frame's
    keys and values) for stage-1 calls holding runs of `num_frames` frames of a video each: the number of runs (the
    call's videos times the 1 to 3 guidance copies the stock pipeline stacks) is read from each batch rather than
    fixed."""

    def __init__(self):
        super().__init__(batch_size=1)
        self.num_frames = 1

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        self.batch_size = hidden_states.shape[0] // self.num_frames
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)


@contextlib.contextmanager
def self_attention_processor(models, processor):
    """Sets `processor` on the self-attention (`attn1`) of every transformer block of `models` for the block and
    restores the processors it replaced: the same UNet inverts afterwards, frame by frame. Module by module rather
    than with diffusers' `set_attn_processor`, which a `MultiControlNetModel` does not have."""
    replaced = [
        (module, module.processor)
        for model in models
        if model is not None
        for name, module in model.named_modules()
        if isinstance(module, Attention) and name.endswith("attn1")
    ]
    try:
        for module, _ in replaced:
            module.set_processor(processor)
        yield
    finally:
        for module, previous in replaced:
            module.set_processor(previous)


def derive_generators(generator: torch.Generator, count: int) -> list[torch.Generator]:
    """`count` generators seeded from `generator`: seeds `torch.randint(0, 2**62, (count,), generator=generator)`,
    each giving `torch.Generator(generator.device).manual_seed(seed)`."""
    seeds = torch.randint(0, 2**62, (count,), generator=generator, device=generator.device).tolist()
    return [torch.Generator(device=generator.device).manual_seed(int(s)) for s in seeds]


def video_frame_generators(generator, num_videos: int, num_frames: int) -> list[list[torch.Generator]] | None:
    """One generator per frame of every video, `[video][frame]`.

    - one generator: F generators per video derived from it, video after video (`derive_generators` of B * F);
    - a list with one generator per video: each video's F generators derived from its own;
    - a list (per video) of lists (per frame): used as given.

    Every frame owns its generator, so the frames are the same whether they run in one batch, in chunks of any
    size or one video at a time with the matching generator.
    """
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        flat = derive_generators(generator, num_videos * num_frames)
        return [flat[b * num_frames : (b + 1) * num_frames] for b in range(num_videos)]
    return [list(g) if isinstance(g, (list, tuple)) else derive_generators(g, num_frames) for g in generator]


def count_frames(frames: FrameInput) -> int:
    if isinstance(frames, (list, tuple, np.ndarray, torch.Tensor)):
        return len(frames)
    raise TypeError(f"Frames must be a list of PIL images, a numpy array or a tensor, got {type(frames).__name__}.")


def frame_size(frames: FrameInput) -> tuple[int, int]:
    """(height, width) of the first frame of a PIL list, a (F, H, W, C) array or a (F, C, H, W) tensor."""
    first = frames[0]
    if isinstance(first, PIL.Image.Image):
        return first.height, first.width
    if isinstance(frames, np.ndarray):
        return frames.shape[1], frames.shape[2]
    if isinstance(frames, torch.Tensor):
        return frames.shape[-2], frames.shape[-1]
    if isinstance(first, np.ndarray):
        return first.shape[0], first.shape[1]
    return first.shape[-2], first.shape[-1]


def as_pil_frames(frames: FrameInput) -> list[PIL.Image.Image]:
    """Frames as PIL images: diffusers' "fill" and "crop" resizing reads PIL images only."""
    if isinstance(frames, (list, tuple)) and all(isinstance(f, PIL.Image.Image) for f in frames):
        return list(frames)
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    return VaeImageProcessor.numpy_to_pil(np.stack([np.asarray(f, dtype=np.float32) for f in frames]))


def text_width(text_encoder) -> int:
    return text_encoder.config.hidden_size


def as_list(value, size: int) -> list:
    """A per-video input as a list of `size`: a single value is broadcast."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * size


def temporal_windows(num_frames: int, size: int | None, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) frame windows of `size` frames overlapping by `overlap`, covering every frame.

    The last window is shifted back to end on the last frame, so every window has exactly `size` frames (a video
    model sees the clip length it was trained on).
    """
    if size is None or num_frames <= size:
        return [(0, num_frames)]
    stride = size - overlap
    starts = list(range(0, num_frames - size + 1, stride))
    if starts[-1] + size < num_frames:
        starts.append(num_frames - size)
    return [(start, start + size) for start in starts]


def window_weights(size: int, overlap: int, first: bool, last: bool) -> torch.Tensor:
    """Per-frame blending weights: linear ramps over the overlaps with neighbouring windows, 1 elsewhere."""
    weights = torch.ones(size)
    ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    if overlap > 0 and not first:
        weights[:overlap] = ramp
    if overlap > 0 and not last:
        weights[size - overlap :] = ramp.flip(0)
    return weights


@contextlib.contextmanager
def clip_text_model_alias(text_encoder):
    """diffusers 0.42's `encode_prompt(clip_skip=...)` applies `text_encoder.text_model.final_layer_norm`, where
    transformers 5's `CLIPTextModel` holds that norm itself and has no `text_model`. For the call, the encoder
    answers to `text_model` as well, so diffusers' own code runs unchanged on either version."""
    if text_encoder is None or hasattr(text_encoder, "text_model") or not hasattr(text_encoder, "final_layer_norm"):
        yield
        return
    # Set past `nn.Module.__setattr__`, so the alias is not registered as a submodule (a cycle in `.modules()`).
    text_encoder.__dict__["text_model"] = text_encoder
    try:
        yield
    finally:
        del text_encoder.__dict__["text_model"]


# Any video UNet in SD's latent space; diffusers' `from_pipe` carries one over only when its exact class is named here,
# so another class (VidRD's) is passed to `from_pipe` by name.
VideoUNet = UNet3DConditionModel | UNetMotionModel | ModelMixin


def is_motion_unet(unet) -> bool:
    """AnimateDiff's `UNetMotionModel` wants its text embeddings repeated per frame; `UNet3DConditionModel` and
    the VidRD UNet repeat them themselves."""
    # `torch.compile(unet)` wraps the model: its class is the wrapped one's.
    return isinstance(unwrap_module(unet), UNetMotionModel) or getattr(unet.config, "text_embeds_per_frame", False)


def carries_ip_adapter(unet) -> bool:
    """Whether `unet` holds an IP-Adapter (`load_ip_adapter`): it then runs only with image-prompt embeddings."""
    return unet is not None and getattr(unet.config, "encoder_hid_dim_type", None) == "ip_image_proj"


def shares_attention(video_unet, unet) -> bool:
    """Whether `video_unet` runs `unet`'s own attention modules, as an AnimateDiff UNet from
    `motion_unet_sharing_weights` does, and so their attention processors too."""
    own = {id(module) for module in unet.modules() if isinstance(module, Attention)} if unet is not None else set()
    return any(id(module) in own for module in video_unet.modules() if isinstance(module, Attention))


# IP-Adapter's call arguments: the pipelines whose stage 1 is a stock pipeline taking them take them too.
IMAGE_PROMPT_ARGUMENTS = ("ip_adapter_image", "ip_adapter_image_embeds")

SHARED_ARGS_DOC = """
            video_prompt (`str` or `list[str]`, *optional*): The video model's prompt, one per prompt or one for all;
                defaults to `prompt`.
            num_videos_per_prompt (`int`, defaults to 1): Videos made for each prompt.
            negative_prompt (`str` or `list[str]`, *optional*): Negative prompt of both models, one per prompt or
                one for all; also what both inversions are conditioned on (the original's behaviour).
            inversion_prompt (`str` or `list[str]`, *optional*): Conditions both inversions instead.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor` `(N, 77, D)`, *optional*): The image text
                encoder's embeddings, instead of `prompt` / `negative_prompt`.
            video_prompt_embeds, negative_video_prompt_embeds (`torch.Tensor`, *optional*): The same for the video
                text encoder.
            height, width (`int`, *optional*): Output size, multiples of 8; default the input frames' size rounded
                down to a multiple of 8.
            resize_mode (`str`, defaults to `"default"`): How source frames reach the output size, as diffusers'
                `VaeImageProcessor`: `"default"` resizes, `"fill"` keeps the aspect ratio and pads, `"crop"` keeps
                it and crops.
            num_inference_steps (`int`, defaults to 50): Steps of the image model and of smoothing.
            num_inversion_steps (`int`, *optional*): DDIM inversion steps; defaults to `num_inference_steps`.
            strength (`float`, defaults to 1.0): How far up the noise schedule Mixed Inversion climbs and smoothing
                comes back down, as `strength` in diffusers' video-to-video pipelines: the first
                `int(num_inversion_steps * strength)` inversion steps, then the last
                `int(num_inference_steps * strength)` smoothing steps. 1 is the original's full inversion; lower
                values keep more of stage 1's frames (less smoothing, fewer video-UNet calls).
            guidance_scale (`float`, defaults to 7.5): CFG of the image model.
            video_guidance_scale (`float`, *optional*): CFG of smoothing; defaults to `guidance_scale`. Read from
                `pipe._guidance_scale` at every smoothing step, so a step callback may change it.
            mixing_ratio (`float`): Weight r of the image-model inversion in `r * z_T(image) + (1 - r) *
                z_T(video)`; r = 1 runs no video-UNet inversion, r = 0 no image-UNet one.
            pool_norms_over_frames (`bool`, defaults to `True`): In the image-model inversion, the ResNet and output
                GroupNorms take their statistics over all frames of the clip (of each window with
                `enable_video_windows`), as the original's inflated UNet did; the clip then runs in one UNet call.
                `False` normalises each frame on its own (frames independent, `frame_batch_size` per call).
            reencode_frames (`bool`, defaults to `True`): Invert what the original inverted: stage 1's latents
                decoded to rounded 8-bit frames and VAE-encoded again (a posterior sample, one draw per video from
                `generator`; the mean without one). `False` inverts stage 1's latents directly (no VAE round trip).
            cross_frame_attention (`bool`, defaults to `False`): In stage 1, every frame's self-attention reads the
                keys and values of its video's first frame (Text2Video-Zero's cross-frame attention, diffusers'
                `CrossFrameAttnProcessor2_0`), in the UNet and a ControlNet: frames agree more on appearance before
                smoothing. A video longer than `frame_batch_size` runs in batches that each carry its first frame
                (computed again).
                `False` is the original's: each frame on its own.
            frame_batch_size (`int`, defaults to 8): Frames per image-model call (stage 1, and the image inversion
                when `pool_norms_over_frames=False`).
            decode_chunk_size (`int`, defaults to 8): Frames per VAE call (encoding and decoding).
            generator (`torch.Generator`, `list[torch.Generator]` or `list[list[torch.Generator]]`, *optional*):
                One generator, one per video, or one per frame of every video. Each video's frames get generators
                derived from its own (see `video_frame_generators`), so a batch of videos gives the same frames as
                one call per video with the matching generator.
            latents (`torch.Tensor` `(B, 4, F, h, w)`, *optional*): Initial noise of stage 1.
            output_type (`str`, defaults to `"np"`): `"np"`, `"pt"`, `"pil"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): Return the output dataclass rather than a tuple.
            cross_attention_kwargs (`dict`, *optional*): Passed to the image model's attention processors;
                `{"scale": s}` scales its LoRA.
            clip_skip (`int`, *optional*): CLIP layers skipped when encoding the image prompts.
            ip_adapter_image (`PipelineImageInput` or `list`, *optional*): The image prompt of the IP-Adapter loaded
                with `load_ip_adapter` (a list: one entry per adapter), for every frame of every video. Encoded once
                per call; the image branch of the inversion reads it too when it inverts with `unet`, and so does an
                AnimateDiff video UNet that runs `unet`'s layers (`motion_unet_sharing_weights`).
            ip_adapter_image_embeds (`list[torch.Tensor]`, *optional*): Its embeddings instead, one tensor per
                adapter, laid out as the stock image pipeline's (with the negative embeddings under guidance).
            callback_on_step_end (`Callable`, *optional*): Called after each smoothing step as
                `callback_on_step_end(self, step, timestep, callback_kwargs)`; may return new `latents`.
            callback_on_step_end_tensor_inputs (`list`): Tensors passed in `callback_kwargs`.
"""


def _shared_call_arguments(
    *,
    video_prompt: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    inversion_prompt: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    resize_mode: str = "default",
    num_inference_steps: int = 50,
    num_inversion_steps: int | None = None,
    strength: float = 1.0,
    guidance_scale: float = 7.5,
    video_guidance_scale: float | None = None,
    pool_norms_over_frames: bool = True,
    reencode_frames: bool = True,
    cross_frame_attention: bool = False,
    num_videos_per_prompt: int = 1,
    frame_batch_size: int = 8,
    decode_chunk_size: int = 8,
    generator: torch.Generator | list[torch.Generator] | list[list[torch.Generator]] | None = None,
    latents: torch.Tensor | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    video_prompt_embeds: torch.Tensor | None = None,
    negative_video_prompt_embeds: torch.Tensor | None = None,
    output_type: str = "np",
    return_idm_frames: bool = True,
    return_dict: bool = True,
    cross_attention_kwargs: dict | None = None,
    clip_skip: int | None = None,
    ip_adapter_image: PipelineImageInput | None = None,
    ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
    callback_on_step_end_tensor_inputs: list[str] = ["latents"],
):
    """The keywords every pipeline's `__call__` takes after its own (described in `SHARED_ARGS_DOC`)."""


def _shared_args_doc(without: tuple[str, ...], own_doc: str) -> str:
    """`SHARED_ARGS_DOC` less the entries whose arguments are all in `without` or described in `own_doc` (where a
    pipeline gives a shared argument its own meaning)."""
    entries = re.split(r"\n(?=            \S)", SHARED_ARGS_DOC.strip("\n"))
    own = re.findall(r"^ {12}(\w+(?:, \w+)*)(?: \(|:)", own_doc, re.M)
    skip = set(without) | {name for entry in own for name in entry.split(", ")}
    kept = [e for e in entries if not set(re.findall(r"\w+", e.split("(", 1)[0])) <= skip]
    return "\n".join(kept) + "\n"


def pipeline_call(example: str, without: tuple[str, ...] = ()):
    """Decorates a pipeline's `__call__(self, <its own arguments>, **shared)`. Its signature gains the keywords of
    `_shared_call_arguments` (less `without`), so `inspect.signature` and `help()` show the whole call and an unknown
    keyword is refused as by any function; its docstring gains their descriptions and the `example` code (doctest
    lines) under "Examples:"; it runs without autograd. The shared keywords reach the function in `shared`."""
    shared = [p for p in inspect.signature(_shared_call_arguments).parameters.values() if p.name not in without]

    def decorate(func):
        own = [p for p in inspect.signature(func).parameters.values() if p.kind is not p.VAR_KEYWORD]
        signature = inspect.Signature([*own, *shared])

        @functools.wraps(func)
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with torch.no_grad():
                return func(**bound.arguments)

        call.__signature__ = signature
        own_doc, examples = func.__doc__.split("\n        Examples:", 1)
        call.__doc__ = f"{own_doc.rstrip()}\n{_shared_args_doc(without, own_doc)}\n        Examples:{examples}"
        return replace_example_docstring(f"    Examples:\n        ```py{example}        ```")(call)

    return decorate


class MixedInversionMixin(StableDiffusionMixin, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin):
    r"""
    The BIVDiff skeleton, for a pipeline that registers `vae`, `text_encoder`, `tokenizer`, `unet` (or
    `inversion_unet`), `video_unet`, `video_text_encoder`, `video_tokenizer`, `scheduler` and optionally
    `inverse_scheduler`.

    A pipeline supplies its `check_inputs(call)`, `generate_frames(call)` (stage 1: clean latents (B, C, F, h, w))
    and its `__call__` signature and docstring; `run` does the rest: Mixed Inversion DDIM-inverts the clean latents
    twice, with the image UNet frame by frame and with the video UNet on the whole clip, and mixes the two noises:
    `z_T = r * z_T(image) + (1 - r) * z_T(video)`. A branch whose weight is zero is not run. Smoothing denoises
    `z_T` with the video UNet (DDIM, eta 0, batched CFG).

    LoRA (`load_lora_weights`), textual inversion (`load_textual_inversion`), FreeU (`enable_freeu`) and fused
    attention projections (`fuse_qkv_projections`, the image UNet's and the VAE's) apply to the image model: stage 1
    and the image branch of the inversion when it uses `unet`.
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    output_class = BIVDiffPipelineOutput

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel | None,
        tokenizer: CLIPTokenizer | None,
        unet: UNet2DConditionModel | None,
        video_unet: VideoUNet,
        video_text_encoder: CLIPTextModel,
        video_tokenizer: CLIPTokenizer,
        scheduler: KarrasDiffusionSchedulers,
        inverse_scheduler: SchedulerMixin | None = None,
        inversion_unet: UNet2DConditionModel | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            video_unet=video_unet,
            video_text_encoder=video_text_encoder,
            video_tokenizer=video_tokenizer,
            scheduler=scheduler,
            inverse_scheduler=inverse_scheduler,
            inversion_unet=inversion_unet,
        )
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ properties (diffusers conventions)
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    def stage1_guided(self, guidance_scale: float) -> bool:
        """Whether stage 1's stock pipeline runs a CFG batch at `guidance_scale`: as it decides, none for
        guidance-distilled UNets (`time_cond_proj_dim`)."""
        return guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @property
    def cross_attention_kwargs(self) -> dict | None:
        return getattr(self, "_cross_attention_kwargs", None)

    @property
    def clip_skip(self) -> int | None:
        return getattr(self, "_clip_skip", None)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) is not None else 8

    @property
    def image_inversion_unet(self):
        """The UNet that inverts frame by frame: `inversion_unet` when set, else the IDM's own `unet`."""
        return getattr(self, "inversion_unet", None) or getattr(self, "unet", None)

    @property
    def inversion_scheduler(self):
        """`inverse_scheduler`, or the original's inversion step built from `scheduler.config` when it is unset."""
        if getattr(self, "inverse_scheduler", None) is not None:
            return self.inverse_scheduler
        if getattr(self, "_default_inverse_scheduler", None) is None:
            self._default_inverse_scheduler = BIVDiffDDIMInverseScheduler.from_config(self.scheduler.config)
        return self._default_inverse_scheduler

    # ------------------------------------------------------------------ long videos
    def enable_video_windows(self, size: int = 16, overlap: int = 4):
        """Run the video UNet on overlapping windows of `size` frames and blend their noise predictions.

        Peak memory of the video branch then depends on `size`, not on the clip length; use it for clips longer
        than the video model was trained on (8 for VidRD, 24 for ZeroScope). Overlapping frames are averaged with
        linear ramps so window borders do not show.
        """
        if not 0 <= overlap < size:
            raise ValueError(f"`overlap` must be in [0, size), got overlap={overlap}, size={size}.")
        self._video_windows = (size, overlap)

    def disable_video_windows(self):
        """Run the video UNet on the whole clip, however long. Until either call, a clip longer than the video
        model's native length (`native_num_frames`) runs in windows of that length."""
        self._video_windows = None

    # ------------------------------------------------------------------ the two model seams
    def video_unet_noise(
        self, latents: torch.Tensor, timestep, text_embeds: torch.Tensor, image_embeds: list | None = None, **residuals
    ) -> torch.Tensor:
        """The video UNet's noise prediction for (B, C, F, h, w) latents, (B, L, D) text embeddings and, for a video
        UNet carrying an IP-Adapter, one (B, ...) image-prompt embedding per adapter: the one place that knows how
        each video-UNet family takes its inputs. `residuals`: a ControlNet's, for a motion UNet."""
        if is_motion_unet(self.video_unet):
            text_embeds = text_embeds.repeat_interleave(latents.shape[2], dim=0)
        extra = {"added_cond_kwargs": {"image_embeds": image_embeds}} if image_embeds is not None else {}
        return self.video_unet(latents, timestep, encoder_hidden_states=text_embeds, **extra, **residuals).sample

    def image_inversion_noise(
        self, frames: torch.Tensor, timestep, text_embeds: torch.Tensor, frame_batch_size: int, pooled: bool = True
    ) -> torch.Tensor:
        """The image UNet's noise prediction for the latents of one clip, frames folded into the batch (F, C, h, w),
        conditioned on (1, L, D) text embeddings.

        `pooled`: the ResNet and output norms take their statistics over the clip's frames, as the original's
        inflated UNet did, so the clip (or each video window, blended as the video branch blends them) runs in one
        call. Otherwise frames are independent and run `frame_batch_size` at a time.
        """
        unet = self.image_inversion_unet
        kwargs = {"cross_attention_kwargs": self.cross_attention_kwargs} if self.cross_attention_kwargs else {}
        image_prompt = self.inversion_image_prompt(unet)

        def predict(chunk):
            cond = text_embeds.to(unet.dtype).expand(chunk.shape[0], -1, -1)
            extra = dict(kwargs)
            if image_prompt is not None:  # the same image prompt for every frame, as in stage 1
                images = [e.to(unet.dtype).expand(chunk.shape[0], *e.shape[1:]) for e in image_prompt]
                extra["added_cond_kwargs"] = {"image_embeds": images}
            return unet(chunk.to(unet.dtype), timestep, encoder_hidden_states=cond, **extra).sample

        def predict_pooled(window, _frames):
            with pool_group_norms_over_frames(unet, window.shape[0]):
                return predict(window)

        if pooled:
            return self.blend_windows(frames, 0, predict_pooled)
        return torch.cat([predict(frames[i : i + frame_batch_size]) for i in range(0, len(frames), frame_batch_size)])

    def temporal_windows_for(self, num_frames: int) -> tuple[int | None, int]:
        """(size, overlap) of the windows a clip of `num_frames` runs in; size None runs it whole."""
        chosen = getattr(self, "_video_windows", "native")
        if chosen == "native":  # nothing chosen: windows of the video model's training length for longer clips
            chosen = video_windows_for_clip(num_frames, native_num_frames(self.video_unet))
        return chosen or (None, 0)

    def blend_windows(self, sample: torch.Tensor, frame_dim: int, predict) -> torch.Tensor:
        """`predict(sample, frames)`, or with video windows on, `predict` of each window of frames along `frame_dim`,
        blended with linear ramps over the overlaps (memory then depends on the window size, not the clip).
        `frames` is the window's slice of the clip's frames."""
        num_frames = sample.shape[frame_dim]
        size, overlap = self.temporal_windows_for(num_frames)
        windows = temporal_windows(num_frames, size, overlap)
        if len(windows) == 1:
            return predict(sample, slice(0, num_frames))
        shape = [1] * sample.ndim
        shape[frame_dim] = -1
        total = torch.zeros_like(sample, dtype=torch.float32)
        norm = torch.zeros(num_frames, device=sample.device)
        for i, (start, stop) in enumerate(windows):
            weights = window_weights(stop - start, overlap, i == 0, i == len(windows) - 1).to(sample.device)
            out = predict(sample.narrow(frame_dim, start, stop - start), slice(start, stop))
            total.narrow(frame_dim, start, stop - start).add_(out.float() * weights.view(shape))
            norm[start:stop] += weights
        return (total / norm.view(shape)).to(sample.dtype)

    def video_noise_prediction(
        self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, image_embeds: list | None = None
    ) -> torch.Tensor:
        """The video UNet's output on (B, C, F, h, w), whole clip or blended over temporal windows."""

        def predict(window: torch.Tensor, frames: slice) -> torch.Tensor:
            residuals = self.video_unet_residuals(window, timestep, encoder_hidden_states, frames)
            return self.video_unet_noise(window, timestep, encoder_hidden_states, image_embeds, **residuals)

        return self.blend_windows(sample, 2, predict)

    def video_unet_residuals(self, sample: torch.Tensor, timestep, encoder_hidden_states, frames: slice) -> dict:
        """Residuals the video UNet adds to its blocks for these frames of the clip (a ControlNet's); none here."""
        return {}

    # ------------------------------------------------------------------ stages
    def begin_call(self):
        """Resets per-call state; every `__call__` starts with it."""
        self._interrupt = False
        self._image_prompt = None
        self.stage_log = []
        self.current_stage = None

    @contextlib.contextmanager
    def stage(self, name: str):
        """Marks a stage of the call: `current_stage` names it while it runs (profilers attribute model calls
        with it), and `stage_log` keeps its wall time and, on CUDA, its peak allocated memory."""
        device = self._execution_device
        on_cuda = device.type == "cuda"
        if on_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        previous, self.current_stage = getattr(self, "current_stage", None), name
        start = time.perf_counter()
        try:
            yield
        finally:
            if on_cuda:
                torch.cuda.synchronize(device)
            entry = {"stage": name, "seconds": time.perf_counter() - start}
            entry["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if on_cuda else None
            if not hasattr(self, "stage_log"):
                self.stage_log = []
            self.stage_log.append(entry)
            self.current_stage = previous

    @contextlib.contextmanager
    def stage_progress_bar(self, total: int, desc: str):
        """`self.progress_bar` labelled with the stage's name, unless the user set a label."""
        config = getattr(self, "_progress_bar_config", {})
        self._progress_bar_config = {"desc": desc, **config}
        try:
            with self.progress_bar(total=total) as bar:
                yield bar
        finally:
            self._progress_bar_config = config

    def stock_pipeline(self, pipeline_class=StableDiffusionPipeline, desc: str | None = None, **components):
        """A stock diffusers SD-family pipeline built from this pipeline's own components (no copies), with this
        pipeline's progress-bar settings."""
        defaults = dict(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=getattr(self, "feature_extractor", None),
            requires_safety_checker=False,
        )
        if "image_encoder" in inspect.signature(pipeline_class).parameters:  # T2I-Adapter's pipeline has none
            defaults["image_encoder"] = getattr(self, "image_encoder", None)
        pipe = pipeline_class(**{**defaults, **components})
        config = dict(getattr(self, "_progress_bar_config", {}))
        if desc is not None:
            config.setdefault("desc", desc)
        pipe.set_progress_bar_config(**config)
        return pipe

    # ------------------------------------------------------------------ checks
    def check_mixed_inversion_inputs(
        self, height, width, mixing_ratio, num_inference_steps, num_inversion_steps, strength=1.0
    ):
        """Checks shared by every pipeline; raise before any model runs."""
        if height % 8 != 0 or width % 8 != 0:
            raise ValueError(
                f"`height` and `width` must be divisible by 8, got {height}x{width}; "
                f"use {height // 8 * 8}x{width // 8 * 8}."
            )
        if not isinstance(mixing_ratio, (int, float)) or not 0.0 <= mixing_ratio <= 1.0:
            raise ValueError(
                f"`mixing_ratio` must be in [0, 1] (1 = image-model inversion only, 0 = video-model only), "
                f"got {mixing_ratio!r}."
            )
        for name, steps in (
            ("num_inference_steps", num_inference_steps),
            ("num_inversion_steps", num_inversion_steps),
        ):
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {steps!r}.")
        if not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise ValueError(f"`strength` must be in (0, 1] (1 = the full inversion), got {strength!r}.")
        fewest = min(num_inference_steps, num_inversion_steps)
        if strength_steps(fewest, strength) < 1:
            raise ValueError(
                f"`strength`={strength} leaves no step of {fewest}: `num_inference_steps` and `num_inversion_steps` "
                f"times `strength` must each be at least 1; use strength >= {math.ceil(1e4 / fewest) / 1e4:g}."
            )
        self.check_video_components()
        if mixing_ratio > 0:
            self.check_image_inversion_components()

    def check_call_options(self, call):
        """Checks of the options every pipeline's `__call__` shares."""
        for name in ("frame_batch_size", "decode_chunk_size", "num_videos_per_prompt"):
            value = getattr(call, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if call.output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {call.output_type!r}.")
        if call.resize_mode not in RESIZE_MODES:
            raise ValueError(f"`resize_mode` must be one of {RESIZE_MODES}, got {call.resize_mode!r}.")
        for name in ("guidance_scale", "video_guidance_scale"):
            if not isinstance(getattr(call, name), (int, float)):
                raise ValueError(f"`{name}` must be a number, got {getattr(call, name)!r}.")
        if not isinstance(call.cross_frame_attention, bool):
            raise ValueError(f"`cross_frame_attention` must be True or False, got {call.cross_frame_attention!r}.")
        if call.cross_frame_attention and call.frame_batch_size < 2 and call.num_frames > 1:
            raise ValueError(
                "`cross_frame_attention` needs `frame_batch_size` >= 2: each batch of a video's frames carries its "
                "first frame, which the others attend to."
            )
        tensor_inputs = call.callback_on_step_end_tensor_inputs
        if tensor_inputs is not None and any(k not in self._callback_tensor_inputs for k in tensor_inputs):
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}.")
        self.check_batch_inputs(call)
        self.check_mixed_inversion_inputs(
            call.height,
            call.width,
            call.mixing_ratio,
            call.num_inference_steps,
            call.num_inversion_steps,
            call.strength,
        )

    def check_batch_inputs(self, call):
        """Per-video inputs agree on the number of prompts; generators and latents on the number of videos."""
        num_prompts = call.num_prompts
        for name in ("prompt", "video_prompt", "negative_prompt", "inversion_prompt", "source_prompt"):
            value = getattr(call, name, None)
            if isinstance(value, (list, tuple)) and len(value) != num_prompts:
                raise ValueError(f"`{name}` is a list of {len(value)} but there are {num_prompts} prompts.")
            if value is not None and not isinstance(value, (str, list, tuple)):
                raise ValueError(f"`{name}` must be a string or a list of strings, got {type(value).__name__}.")
        for name in ("prompt_embeds", "negative_prompt_embeds", "video_prompt_embeds", "negative_video_prompt_embeds"):
            value = getattr(call, name, None)
            if value is not None and (value.ndim != 3 or value.shape[0] != num_prompts):
                raise ValueError(
                    f"`{name}` must be (N, L, D) with one row per prompt ({num_prompts}), got {tuple(value.shape)}."
                )
        num_videos, num_frames = call.batch_size, call.num_frames
        generator = call.generator
        if isinstance(generator, (list, tuple)):
            if len(generator) != num_videos:
                raise ValueError(
                    f"`generator` is a list of {len(generator)}; pass one generator, one per video ({num_videos}), "
                    f"or one list of {num_frames} per video."
                )
            for g in generator:
                if isinstance(g, (list, tuple)) and len(g) != num_frames:
                    raise ValueError(
                        f"A per-frame `generator` list holds {len(g)}; pass one per frame ({num_frames})."
                    )
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"`generator` must be a torch.Generator or a list of them, got {type(generator).__name__}."
            )
        latents = getattr(call, "latents", None)
        if latents is not None:
            expected = (num_videos, self.vae.config.latent_channels, num_frames)
            if latents.ndim != 5 or tuple(latents.shape[:3]) != expected:
                raise ValueError(
                    f"`latents` must be stage 1's initial noise (B, C, F, h, w) for {num_videos} video(s) of "
                    f"{num_frames} frames, {expected[1]} channels; got shape {tuple(latents.shape)}."
                )

    def check_video_components(self):
        width = text_width(self.video_text_encoder)
        if self.video_unet.config.cross_attention_dim != width:
            raise ValueError(
                f"`video_unet` expects text embeddings of width {self.video_unet.config.cross_attention_dim} but "
                f"`video_text_encoder` produces {width}: the video UNet and its text encoder come from different "
                "models. Load both from the same video model."
            )
        latent_channels = self.vae.config.latent_channels
        if self.video_unet.config.in_channels != latent_channels:
            raise ValueError(
                f"`video_unet` takes {self.video_unet.config.in_channels}-channel latents but the VAE makes "
                f"{latent_channels}: the video model does not share the image model's latent space."
            )

    def check_image_inversion_components(self):
        unet = self.image_inversion_unet
        if unet is None or self.text_encoder is None:
            raise ValueError(
                "`mixing_ratio` > 0 needs an image UNet and `text_encoder` for the image branch of the inversion; "
                "set `mixing_ratio=0` or pass `unet`/`inversion_unet` (an SD-1.5 UNet) and `text_encoder`."
            )
        if unet.config.in_channels != self.vae.config.latent_channels:
            raise ValueError(
                f"The image branch of the inversion needs a plain {self.vae.config.latent_channels}-channel UNet, "
                f"but `unet` takes {unet.config.in_channels} channels (an InstructPix2Pix or inpainting UNet). Pass "
                "`inversion_unet` (an SD-1.5 UNet2DConditionModel, e.g. from "
                "'stable-diffusion-v1-5/stable-diffusion-v1-5', subfolder 'unet'), or set `mixing_ratio=0`."
            )
        if unet.config.cross_attention_dim != text_width(self.text_encoder):
            raise ValueError(
                f"The image inversion UNet expects text embeddings of width {unet.config.cross_attention_dim} but "
                f"`text_encoder` produces {text_width(self.text_encoder)}."
            )

    def check_image_model(self, in_channels: tuple[int, ...], what: str):
        """Stage 1's `unet` takes one of `in_channels` and reads the image text encoder's embeddings."""
        if self.unet.config.in_channels not in in_channels:
            raise ValueError(
                f"`unet` must be {what} taking {' or '.join(map(str, in_channels))} channels, got "
                f"{self.unet.config.in_channels}."
            )
        if self.unet.config.cross_attention_dim != text_width(self.text_encoder):
            raise ValueError(
                f"`unet` expects text embeddings of width {self.unet.config.cross_attention_dim} but `text_encoder` "
                f"produces {text_width(self.text_encoder)}."
            )

    # ------------------------------------------------------------------ prompts
    def _encode_with(
        self,
        text_encoder,
        tokenizer,
        prompt,
        device,
        num_videos_per_prompt: int,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The stock pipeline's `encode_prompt` (truncation, attention masks, clip_skip, LoRA scale, textual
        # inversion tokens) is reused on the given encoder rather than rewritten.
        text = self.stock_pipeline(vae=None, unet=None, text_encoder=text_encoder, tokenizer=tokenizer)
        if isinstance(prompt, (list, tuple)) and isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)
        with clip_text_model_alias(text_encoder if clip_skip else None):
            return text.encode_prompt(
                prompt,
                device,
                num_videos_per_prompt,
                True,
                negative_prompt,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                lora_scale=lora_scale,
                clip_skip=clip_skip,
            )

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_videos_per_prompt: int = 1,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt, negative) embeddings of the image text encoder, `num_videos_per_prompt` rows per prompt:
        diffusers' `StableDiffusionPipeline.encode_prompt` on this pipeline's `text_encoder` and `tokenizer`."""
        arguments = (prompt, device, num_videos_per_prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        return self._encode_with(self.text_encoder, self.tokenizer, *arguments, lora_scale, clip_skip)

    def encode_video_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_videos_per_prompt: int = 1,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt, negative) embeddings of the video text encoder, as `encode_prompt` does for the image one."""
        arguments = (prompt, device, num_videos_per_prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        return self._encode_with(self.video_text_encoder, self.video_tokenizer, *arguments)

    def encode_call_prompts(self, call, device) -> SimpleNamespace:
        """Every embedding a call needs, each encoded once: the image model's (stage 1), the video model's
        (smoothing) and the inversion conditions of both branches, one row per video."""
        k = call.num_videos_per_prompt
        embeds = SimpleNamespace(image=None, image_negative=None, image_cond=None, video_cond=None)
        lora_scale = (call.cross_attention_kwargs or {}).get("scale")
        if self.uses_image_prompt:
            embeds.image, embeds.image_negative = self.encode_prompt(
                call.prompt,
                device,
                k,
                call.negative_prompt,
                call.prompt_embeds,
                call.negative_prompt_embeds,
                lora_scale=lora_scale,
                clip_skip=call.clip_skip,
            )
        inversion_prompt = call.inversion_prompt
        if inversion_prompt is not None:
            inversion_prompt = as_list(inversion_prompt, call.num_prompts)
        needs_image_cond = call.mixing_ratio > 0 or self.always_inverts_with_image_unet
        if needs_image_cond:
            if inversion_prompt is not None:
                embeds.image_cond = self.encode_prompt(inversion_prompt, device, k, lora_scale=lora_scale)[0]
            elif embeds.image_negative is not None:
                embeds.image_cond = embeds.image_negative
            else:
                negative = as_list(call.negative_prompt or "", call.num_prompts)
                embeds.image_cond = self.encode_prompt(negative, device, k, lora_scale=lora_scale)[0]
        # AnimateDiff reads the image model's own CLIP: with the same encoder and the same words, the image
        # embeddings are the video ones, so they are not encoded twice.
        shared = self.video_text_encoder is self.text_encoder and self.video_tokenizer is self.tokenizer
        if shared and embeds.image is not None and call.video_prompt == call.prompt and call.prompt is not None:
            embeds.video, embeds.video_negative = embeds.image, embeds.image_negative
        else:
            embeds.video, embeds.video_negative = self.encode_video_prompt(
                call.video_prompt,
                device,
                k,
                call.negative_prompt,
                call.video_prompt_embeds,
                call.negative_video_prompt_embeds,
            )
        if inversion_prompt is not None and call.mixing_ratio < 1:
            if shared and embeds.image_cond is not None:
                embeds.video_cond = embeds.image_cond
            else:
                embeds.video_cond = self.encode_video_prompt(inversion_prompt, device, k)[0]
        else:
            embeds.video_cond = embeds.video_negative
        return embeds

    # stage 1 of a pipeline reads `prompt` with the image text encoder; BIVDiffPipeline has no stage 1
    uses_image_prompt = True
    video_prompt_defaults_to_prompt = True
    # Prompt2Prompt inverts its source video with the image UNet whatever `mixing_ratio` is
    always_inverts_with_image_unet = False
    # stage 1 samples every frame with its own generator (see `video_frame_generators`); pipelines without a
    # sampling stage 1 leave the call's generator untouched for the VAE posterior draw
    derives_frame_generators = True

    # ------------------------------------------------------------------ VAE
    def source_pixels(self, video: FrameInput, height: int, width: int, resize_mode: str = "default") -> torch.Tensor:
        """Source frames as a (F, 3, H, W) tensor in [0, 1] at the output size: resized like the VAE's input but
        not normalised, because the stock image pipelines normalise what they are given and paste-back needs the
        exact source pixels."""
        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_convert_rgb=True)
        return processor.preprocess(self.resize_frames(video, height, width, resize_mode), height=height, width=width)

    @staticmethod
    def resize_frames(frames: FrameInput, height: int, width: int, resize_mode: str) -> FrameInput:
        """Frames as given for `"default"` (the stock pipelines resize them); for `"fill"` and `"crop"`, PIL
        frames already at the output size with the aspect ratio kept."""
        if resize_mode == "default":
            return frames
        processor = VaeImageProcessor()
        return [processor.resize(f, height, width, resize_mode=resize_mode) for f in as_pil_frames(frames)]

    def encode_frames(
        self,
        pixels: torch.Tensor,
        chunk_size: int,
        generator: torch.Generator | list | None = None,
        num_videos: int = 1,
        num_frames: int | None = None,
    ) -> torch.Tensor:
        """Pixels (F, 3, H, W) in [0, 1] (the same for every video) or (B * F, 3, H, W) (video-major, pass
        `num_frames`) -> scaled
        latents (B, C, F, h, w), `chunk_size` frames per VAE call.

        A posterior sample, as the original's `latent_dist.sample()`: one draw for all frames of a video, from the
        call's generator (a list gives each video its own; a video's list of per-frame generators draws frame by
        frame); without a generator, the posterior mean.
        """
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        device = self._execution_device
        num_frames = num_frames or pixels.shape[0]
        pixels = self.video_processor.normalize(pixels)
        with self.stage("VAE encoding"):
            chunks = [pixels[i : i + chunk_size].to(device, self.vae.dtype) for i in range(0, len(pixels), chunk_size)]
            moments = torch.cat([self.vae.encode(chunk).latent_dist.parameters for chunk in chunks])
            if len(moments) != num_videos * num_frames:
                moments = moments.repeat(num_videos, 1, 1, 1)
            latents = []
            for b, g in enumerate(as_list(generator, num_videos) if generator is not None else [None] * num_videos):
                dist = DiagonalGaussianDistribution(moments[b * num_frames : (b + 1) * num_frames])
                latents.append(dist.mode() if g is None else dist.sample(generator=g))
        return unfold_frames(torch.cat(latents) * self.vae.config.scaling_factor, num_frames)

    def reencode_latents(self, latents: torch.Tensor, call) -> torch.Tensor:
        """The original's input to the inversion: latents (B, C, F, h, w) decoded to rounded 8-bit frames and
        VAE-encoded again (`encode_frames`, from the call's generator)."""
        with self.stage("decoding"):
            pixels = fold_frames(self.decode_latents(latents, call.decode_chunk_size))
        # As the stock pipelines' 8-bit output: [0, 1] in fp32, times 255, rounded; read back as u8 / 255.
        frames = ((pixels / 2 + 0.5).clamp(0, 1).float() * 255).round() / 255
        return self.encode_frames(
            frames, call.decode_chunk_size, call.generator, len(latents), latents.shape[2]
        )

    def decode_latents(self, latents: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """Scaled latents (B, C, F, h, w) -> pixels (B, 3, F, H, W) in [-1, 1], `chunk_size` frames per VAE call."""
        num_frames = latents.shape[2]
        folded = fold_frames(latents) / self.vae.config.scaling_factor
        pixels = [
            self.vae.decode(folded[i : i + chunk_size].to(self.vae.dtype)).sample
            for i in range(0, folded.shape[0], chunk_size)
        ]
        return unfold_frames(torch.cat(pixels), num_frames)

    def postprocess(self, latents: torch.Tensor, output_type: str, decode_chunk_size: int):
        if output_type == "latent":
            return latents
        with self.stage("decoding"):
            video = self.decode_latents(latents, decode_chunk_size)
        return self.video_processor.postprocess_video(video=video.float(), output_type=output_type)

    # ------------------------------------------------------------------ stage 1 (the stock image pipelines)
    def run_frame_batches(self, pipe, call, embeds, frame_inputs, **kwargs) -> torch.Tensor:
        """Runs the stock image pipeline `pipe` on every frame of every video, `frame_batch_size` frames per call;
        returns the clean latents (B, C, F, h, w).

        Frame i of the folded batch is frame `i % F` of video `i // F`: it gets its video's embeddings, its own
        generator and its initial noise; `frame_inputs(frame_indices)` gives the task's per-frame inputs (condition
        images, source frames, masks). With `cross_frame_attention`, the self-attention of `pipe`'s UNet (and
        ControlNet) reads each video's first frame, which every call holding any of its frames carries
        (`frame_batches`).
        """
        num_frames, anchored = call.num_frames, call.cross_frame_attention
        generators = call.frame_generators
        if anchored and generators is None:
            # A first frame computed again must draw the same noise: without a generator, each frame still gets
            # one, seeded from torch's global generator.
            seed = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
            generators = video_frame_generators(seed, call.batch_size, num_frames)
        # A first frame computed again starts from its generator's state before its first call.
        first_states = [video[0].get_state() for video in generators] if anchored else None
        noise = fold_frames(call.latents).to(self.unet.dtype) if call.latents is not None else None
        prompt_embeds = embeds.image.repeat_interleave(num_frames, dim=0)
        negative_embeds = embeds.image_negative.repeat_interleave(num_frames, dim=0)
        image_prompt = self.prepare_image_prompt(pipe, call)
        processor = FirstFrameAttnProcessor()
        models = (pipe.unet, getattr(pipe, "controlnet", None)) if anchored else ()
        chunks, done = [], 0
        with self_attention_processor(models, processor):
            for indices in frame_batches(call.batch_size, num_frames, call.frame_batch_size, anchored):
                repeated = indices[0] < done  # the video's first frame again
                processor.num_frames = min(len(indices), num_frames)  # the frames of each video in the call
                frame_generators = None
                if generators:
                    frame_generators = [generators[i // num_frames][i % num_frames] for i in indices]
                if repeated:
                    state = first_states[indices[0] // num_frames]
                    frame_generators[0] = torch.Generator(frame_generators[0].device).set_state(state)
                out = pipe(
                    prompt_embeds=prompt_embeds[indices],
                    negative_prompt_embeds=negative_embeds[indices],
                    num_inference_steps=call.num_inference_steps,
                    guidance_scale=call.guidance_scale,
                    generator=frame_generators,
                    latents=noise[indices] if noise is not None else None,
                    cross_attention_kwargs=call.cross_attention_kwargs,
                    output_type="latent",
                    **image_prompt,
                    **kwargs,
                    **frame_inputs([i % num_frames for i in indices]),
                )
                chunks.append(out.images[1:] if repeated else out.images)
                done = indices[-1] + 1
        return unfold_frames(torch.cat(chunks), num_frames)

    def prepare_image_prompt(self, pipe, call) -> dict:
        """The stock pipeline's keywords for the call's IP-Adapter image prompt: its embeddings, encoded once per call
        by the stock pipeline `pipe` in its own layout and handed to every frame batch."""
        if call.ip_adapter_image is None and call.ip_adapter_image_embeds is None:
            return {}
        guided = self.stage1_guided(call.guidance_scale)
        # A video UNet carrying the adapter needs the negative embeddings for its own guidance even where stage 1
        # runs without (`check_image_prompt` refuses given embeddings without them).
        with_negative = guided or (carries_ip_adapter(self.video_unet) and call.ip_adapter_image is not None)
        embeds = pipe.prepare_ip_adapter_image_embeds(
            call.ip_adapter_image, call.ip_adapter_image_embeds, self._execution_device, 1, with_negative
        )
        # Kept split, (negative or None, positive) per adapter, for the inversion and the video UNet.
        self._image_prompt = [e.chunk(2) if with_negative else (None, e) for e in embeds]
        stage1 = embeds if guided or not with_negative else [positive for _, positive in self._image_prompt]
        return {"ip_adapter_image_embeds": stage1}

    def inversion_image_prompt(self, unet) -> list[torch.Tensor] | None:
        """The conditional IP-Adapter embeddings for an inverting `unet` that carries the adapter, else None. Only a
        4-channel stage-1 UNet inverts, and its stock pipelines (SD, ControlNet, SD Inpainting) lay the embeddings
        out as [negative, positive] under guidance."""
        if not carries_ip_adapter(unet) or getattr(self, "_image_prompt", None) is None:
            return None
        return [positive for _, positive in self._image_prompt]

    def video_image_prompt(self, batch_size: int, guided: bool) -> list[torch.Tensor] | None:
        """The IP-Adapter embeddings for a video UNet that carries the adapter (an AnimateDiff UNet running `unet`'s
        attention layers, or with an adapter of its own), one row per video: under guidance the negative rows first,
        as the latents are batched. None for any other video UNet."""
        if not carries_ip_adapter(self.video_unet) or getattr(self, "_image_prompt", None) is None:
            return None
        rows = []
        for negative, positive in self._image_prompt:
            halves = [negative, positive] if guided else [positive]
            rows.append(torch.cat([h.expand(batch_size, *h.shape[1:]) for h in halves]).to(self.video_unet.dtype))
        return rows

    # ------------------------------------------------------------------ stage 2
    def inversion_timesteps(self, num_steps: int, strength: float, device) -> torch.Tensor:
        """The inversion scheduler's ascending timesteps for `num_steps`, the first `strength` of them."""
        scheduler = self.inversion_scheduler
        scheduler.set_timesteps(num_steps, device=device)
        return scheduler.timesteps[: strength_steps(len(scheduler.timesteps), strength)]

    def invert_image_branch(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        num_steps: int,
        frame_batch_size: int,
        pooled: bool = True,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """DDIM-invert (B, C, F, h, w) latents with the image UNet, one clip at a time with its frames folded into
        the batch, conditioned on (B, L, D) embeddings; `pooled` as in `image_inversion_noise`; `strength` as in
        `inversion_timesteps`. The state stays fp32 between steps."""
        scheduler = self.inversion_scheduler
        num_frames = latents.shape[2]
        clips = [fold_frames(clip[None]).float() for clip in latents]
        timesteps = self.inversion_timesteps(num_steps, strength, latents.device)
        with (
            self.stage("image inversion"),
            self.stage_progress_bar(len(timesteps), "Mixed inversion (image UNet)") as progress_bar,
        ):
            for t in timesteps:
                for b, z in enumerate(clips):
                    eps = self.image_inversion_noise(z, t, cond[b : b + 1], frame_batch_size, pooled)
                    clips[b] = scheduler.step(eps, t, z).prev_sample
                progress_bar.update()
        return torch.cat([unfold_frames(z, num_frames) for z in clips])

    def invert_video_branch(
        self, latents: torch.Tensor, cond: torch.Tensor, num_steps: int, strength: float = 1.0
    ) -> torch.Tensor:
        """DDIM-invert (B, C, F, h, w) latents with the video UNet on whole clips; the state stays fp32."""
        dtype = self.video_unet.dtype
        scheduler = self.inversion_scheduler
        z = latents.float()
        cond = cond.to(dtype)
        timesteps = self.inversion_timesteps(num_steps, strength, z.device)
        image_prompt = self.video_image_prompt(len(z), guided=False)
        with (
            self.stage("video inversion"),
            self.stage_progress_bar(len(timesteps), "Mixed inversion (video UNet)") as progress_bar,
        ):
            for t in timesteps:
                eps = self.video_noise_prediction(z.to(dtype), t, cond, image_prompt)
                z = scheduler.step(eps, t, z).prev_sample
                progress_bar.update()
        return z

    def mixed_inversion(
        self,
        latents: torch.Tensor,
        mixing_ratio: float,
        num_inversion_steps: int,
        frame_batch_size: int,
        image_cond: torch.Tensor | None,
        video_cond: torch.Tensor | None,
        pool_norms_over_frames: bool = True,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """z_T = r * invert_image(z_0) + (1 - r) * invert_video(z_0), computed in fp32, no renormalisation; with
        `strength` < 1 both branches stop at the same lower level."""
        mixed = torch.zeros_like(latents, dtype=torch.float32)
        if mixing_ratio > 0:
            z_img = self.invert_image_branch(
                latents, image_cond, num_inversion_steps, frame_batch_size, pool_norms_over_frames, strength
            )
            mixed = mixed + mixing_ratio * z_img.float()
        if mixing_ratio < 1:
            z_vid = self.invert_video_branch(latents, video_cond, num_inversion_steps, strength)
            mixed = mixed + (1 - mixing_ratio) * z_vid.float()
        return mixed

    # ------------------------------------------------------------------ stage 3
    def smoothing_scheduler(self) -> DDIMScheduler:
        """DDIM (eta 0) with the pipeline scheduler's betas, whatever sampler stage 1 uses (see `ddim_sampler`)."""
        return ddim_sampler(self.scheduler)

    def temporal_smoothing(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        strength: float = 1.0,
    ) -> torch.Tensor:
        """Denoise the mixed noise (B, C, F, h, w) with the video UNet: DDIM, eta 0, CFG in one batched call; with
        `strength` < 1, only the last `int(num_inference_steps * strength)` steps, as diffusers' video-to-video.

        The guidance scale is read from `self._guidance_scale` at every step, so a step callback may change it.
        """
        dtype = self.video_unet.dtype
        scheduler = self.smoothing_scheduler()
        scheduler.set_timesteps(num_inference_steps, device=latents.device)
        timesteps = scheduler.timesteps[len(scheduler.timesteps) - strength_steps(num_inference_steps, strength) :]
        self._guidance_scale = guidance_scale
        self._num_timesteps = len(timesteps)
        latents = latents.to(dtype) * scheduler.init_noise_sigma

        with (
            self.stage("temporal smoothing"),
            self.stage_progress_bar(len(timesteps), "Temporal smoothing (video UNet)") as progress_bar,
        ):
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                cfg = self.do_classifier_free_guidance
                model_in = torch.cat([latents, latents]) if cfg else latents
                embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds
                model_in = scheduler.scale_model_input(model_in, t)
                image_prompt = self.video_image_prompt(len(latents), guided=cfg)
                noise_pred = self.video_noise_prediction(model_in, t, embeds.to(dtype), image_prompt)
                if cfg:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + self.guidance_scale * (noise_text - noise_uncond)
                latents = scheduler.step(noise_pred, t, latents, eta=0.0).prev_sample

                if callback_on_step_end is not None:
                    step_tensors = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {k: step_tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        return latents

    # ------------------------------------------------------------------ stages 2 + 3
    def invert_and_smooth(self, latents: torch.Tensor, call, embeds) -> torch.Tensor:
        """Stages 2 and 3 on clean latents (B, C, F, h, w); returns the smoothed latents."""
        noise = self.mixed_inversion(
            latents,
            call.mixing_ratio,
            call.num_inversion_steps,
            call.frame_batch_size,
            embeds.image_cond,
            embeds.video_cond,
            call.pool_norms_over_frames,
            call.strength,
        )
        return self.temporal_smoothing(
            noise,
            embeds.video,
            embeds.video_negative,
            call.num_inference_steps,
            call.video_guidance_scale,
            call.callback_on_step_end,
            call.callback_on_step_end_tensor_inputs,
            call.strength,
        )

    # ------------------------------------------------------------------ the call
    def input_frames(self, call) -> FrameInput | None:
        """The frames whose count and size give the call's F and default output size."""
        return call.video

    def prepare_call(self, arguments: dict) -> SimpleNamespace:
        """The `__call__` prologue: defaults that depend on other arguments, batch and frame counts, output size."""
        call = SimpleNamespace(**{k: v for k, v in arguments.items() if k not in ("self", "__class__")})
        defaults = dict(
            video=None,
            latents=None,
            prompt_embeds=None,
            negative_prompt_embeds=None,
            video_prompt=None,
            video_prompt_embeds=None,
            negative_video_prompt_embeds=None,
            video_guidance_scale=None,
            return_idm_frames=False,
            ip_adapter_image=None,
            ip_adapter_image_embeds=None,
            pool_norms_over_frames=True,
            reencode_frames=True,
            strength=1.0,
            cross_frame_attention=False,
        )
        for name, value in defaults.items():
            if not hasattr(call, name):
                setattr(call, name, value)
        if isinstance(call.callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            call.callback_on_step_end_tensor_inputs = call.callback_on_step_end.tensor_inputs
        if call.num_inversion_steps is None:
            call.num_inversion_steps = call.num_inference_steps
        if call.video_prompt is None and call.video_prompt_embeds is None and self.video_prompt_defaults_to_prompt:
            call.video_prompt = call.prompt
        if call.video_guidance_scale is None:
            call.video_guidance_scale = call.guidance_scale
        call.num_prompts = self.count_prompts(call)
        call.batch_size = call.num_prompts * call.num_videos_per_prompt
        call.num_frames_given = getattr(call, "num_frames", None)
        frames = self.input_frames(call)
        call.num_frames = count_frames(frames) if frames is not None else 0
        if frames is not None and call.num_frames > 0 and (call.height is None or call.width is None):
            h, w = frame_size(frames)
            call.height, call.width = call.height or h // 8 * 8, call.width or w // 8 * 8
        return call

    def count_prompts(self, call) -> int:
        for name in ("prompt", "video_prompt"):
            value = getattr(call, name, None)
            if isinstance(value, (list, tuple)):
                return len(value)
            if isinstance(value, str):
                return 1
        for name in ("prompt_embeds", "video_prompt_embeds"):
            value = getattr(call, name, None)
            if value is not None:
                return value.shape[0]
        return 1

    def run(self, arguments: dict):
        """Every pipeline's `__call__`: prologue, checks, prompts, stage 1, stages 2 and 3, decoding, output.
        `arguments` are the `__call__`'s locals, the shared keywords gathered in `shared` (see `pipeline_call`)."""
        arguments = {**arguments.pop("shared", {}), **arguments}
        call = self.prepare_call(arguments)
        self.check_inputs(call)
        self.check_call_options(call)
        self.begin_call()
        self._guidance_scale = call.guidance_scale
        self._cross_attention_kwargs = call.cross_attention_kwargs
        self._clip_skip = call.clip_skip
        device = self._execution_device
        call.frame_generators = None
        if self.derives_frame_generators:
            call.frame_generators = video_frame_generators(call.generator, call.batch_size, call.num_frames)

        embeds = self.encode_call_prompts(call, device)
        call.encoded_from_pixels = False
        with self.stage("frame-wise generation"):
            idm_latents = self.generate_frames(call, embeds).to(device)
        clean_latents = idm_latents
        if call.reencode_frames and not call.encoded_from_pixels:
            clean_latents = self.reencode_latents(idm_latents, call)
        video_latents = self.invert_and_smooth(clean_latents, call, embeds)

        frames = self.decode_output(call, video_latents)
        outputs = {"frames": frames, "idm_frames": None}
        if call.return_idm_frames:
            outputs["idm_frames"] = self.postprocess(idm_latents, call.output_type, call.decode_chunk_size)
        outputs.update(self.extra_outputs(call))
        self.maybe_free_model_hooks()
        if not call.return_dict:
            return tuple(outputs.values())
        return self.output_class(**outputs)

    def decode_output(self, call, latents: torch.Tensor):
        return self.postprocess(latents, call.output_type, call.decode_chunk_size)

    def extra_outputs(self, call) -> dict:
        return {}


class ImagePromptMixin(MixedInversionMixin, IPAdapterMixin):
    r"""
    A BIVDiff pipeline whose stage 1 is a stock pipeline that takes IP-Adapter image prompts (ControlNet,
    InstructPix2Pix, SD Inpainting): `load_ip_adapter` loads an adapter into `unet`, and every call then takes
    `ip_adapter_image` (or `ip_adapter_image_embeds`). Registers the adapter's image side, `image_encoder` and
    `feature_extractor`, as diffusers' Stable Diffusion pipelines do, beside `MixedInversionMixin`'s components. An
    AnimateDiff video UNet running `unet`'s attention layers runs the adapter's processors too: loading and unloading
    give it the adapter's image projection and take it away, and smoothing hands it the image prompt.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel | None,
        tokenizer: CLIPTokenizer | None,
        unet: UNet2DConditionModel | None,
        video_unet: VideoUNet,
        video_text_encoder: CLIPTextModel,
        video_tokenizer: CLIPTokenizer,
        scheduler: KarrasDiffusionSchedulers,
        inverse_scheduler: SchedulerMixin | None = None,
        inversion_unet: UNet2DConditionModel | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
    ):
        super().__init__(
            vae, text_encoder, tokenizer, unet, video_unet, video_text_encoder, video_tokenizer, scheduler,
            inverse_scheduler, inversion_unet,
        )  # fmt: skip
        self.register_modules(image_encoder=image_encoder, feature_extractor=feature_extractor)

    # Whether stage 1's image-prompt embeddings are kept for a video UNet that carries the adapter too.
    video_takes_image_prompt = True

    def check_call_options(self, call):
        super().check_call_options(call)
        self.check_image_prompt(call)

    def check_image_prompt(self, call):
        """An IP-Adapter in `unet` and an image prompt in the call come together (the UNet cannot run without one),
        one entry per adapter; a video UNet sharing `unet`'s attention layers cannot take the adapter along."""
        image, embeds = call.ip_adapter_image, call.ip_adapter_image_embeds
        loaded = carries_ip_adapter(self.unet)
        if image is None and embeds is None:
            if loaded:
                raise ValueError(
                    "`unet` carries an IP-Adapter, so every call needs its image prompt: pass `ip_adapter_image` "
                    "(or `ip_adapter_image_embeds`), or call `pipe.unload_ip_adapter()` first."
                )
            return
        if image is not None and embeds is not None:
            raise ValueError("Pass `ip_adapter_image` or `ip_adapter_image_embeds`, not both.")
        if not loaded:
            raise ValueError(
                "`ip_adapter_image` needs an IP-Adapter in `unet`: load one first, e.g. "
                "`pipe.load_ip_adapter('h94/IP-Adapter', subfolder='models', weight_name='ip-adapter_sd15.bin')`."
            )
        if image is not None and self.image_encoder is None:
            raise ValueError(
                "`ip_adapter_image` needs `image_encoder`: load the IP-Adapter with its image encoder "
                "(`load_ip_adapter(..., image_encoder_folder=...)`), or pass `ip_adapter_image_embeds`."
            )
        if embeds is not None and not (
            isinstance(embeds, list) and all(isinstance(e, torch.Tensor) and e.ndim in (3, 4) for e in embeds)
        ):
            raise ValueError("`ip_adapter_image_embeds` must be a list of 3-D or 4-D tensors, one per IP-Adapter.")
        num_adapters = len(self.unet.encoder_hid_proj.image_projection_layers)
        given = len(embeds) if embeds is not None else len(image) if isinstance(image, list) else 1
        if given != num_adapters:
            raise ValueError(
                f"{num_adapters} IP-Adapter(s) are loaded but the image prompt has {given} entries: give one image "
                "(or one list of images, or one embeddings tensor) per adapter."
            )
        self.check_video_image_prompt(call, num_adapters)

    def check_video_image_prompt(self, call, num_adapters: int):
        """A video UNet with IP-Adapter processors (one running `unet`'s attention layers, or with an adapter of its
        own) must carry the adapter's image projection, for the same number of adapters, and get its image prompt
        with negative embeddings when it is guided."""
        ip_processors = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)
        video = self.video_unet
        # Module by module: not every video UNet (VidRD's) lists its processors in `attn_processors`.
        if not any(isinstance(getattr(m, "processor", None), ip_processors) for m in video.modules()):
            return
        if not carries_ip_adapter(video):
            raise ValueError(
                "`video_unet` has IP-Adapter attention processors but no image projection (`encoder_hid_proj`) to "
                "read the image prompt with: load the adapter with `pipe.load_ip_adapter`, which gives an AnimateDiff "
                "UNet running `unet`'s attention layers the projection as well."
            )
        if not self.video_takes_image_prompt:
            raise ValueError(
                f"`video_unet` carries an IP-Adapter, but {type(self).__name__}'s stage 1 encodes the image prompt "
                "inside the stock pipeline, so none is left for the video model: give it a video UNet without one."
            )
        if len(video.encoder_hid_proj.image_projection_layers) != num_adapters:
            raise ValueError(
                f"`unet` carries {num_adapters} IP-Adapter(s) but `video_unet` "
                f"{len(video.encoder_hid_proj.image_projection_layers)}: both read the same image prompt."
            )
        video_guided = call.video_guidance_scale > 1
        if call.ip_adapter_image is None and video_guided and not self.stage1_guided(call.guidance_scale):
            raise ValueError(
                "The video model's guidance needs negative image-prompt embeddings, which unguided "
                "`ip_adapter_image_embeds` lack: pass `ip_adapter_image` instead, or `video_guidance_scale=1`."
            )

    def load_ip_adapter(self, *args, **kwargs):
        super().load_ip_adapter(*args, **kwargs)
        self.share_image_projection()

    load_ip_adapter.__doc__ = IPAdapterMixin.load_ip_adapter.__doc__

    def unload_ip_adapter(self):
        super().unload_ip_adapter()
        self.share_image_projection()

    unload_ip_adapter.__doc__ = IPAdapterMixin.unload_ip_adapter.__doc__

    def share_image_projection(self):
        """A video UNet running `unet`'s attention layers runs their IP-Adapter processors too, so it takes
        `unet`'s image projection along, or none once the adapter is unloaded."""
        video = self.video_unet
        if is_motion_unet(video) and shares_attention(video, self.unet):
            video.encoder_hid_proj = self.unet.encoder_hid_proj
            # Set as diffusers' loader sets it on `unet`: outside the saved config, so a pipeline saved with the
            # adapter loaded reloads as diffusers' own do, without it.
            video.config.encoder_hid_dim_type = self.unet.config.encoder_hid_dim_type


# ---------------------------------------------------------------------- loading
def load_video_model(pretrained_model_name_or_path: str, unet_class: type[ModelMixin] | None = None, **kwargs) -> dict:
    """The video side of a BIVDiff pipeline, `video_unet`, `video_text_encoder` and `video_tokenizer`, from a
    text-to-video folder or Hub repo in diffusers' layout (`unet/`, `text_encoder/`, `tokenizer/`: ModelScope,
    ZeroScope), to pass to a pipeline's `from_pretrained` or constructor. `unet_class` defaults to
    `UNet3DConditionModel`; `kwargs` (`torch_dtype`, `revision`, `local_files_only`, ...) go to every loader."""
    from diffusers import UNet3DConditionModel

    text_kwargs = {k: v for k, v in kwargs.items() if k != "torch_dtype"}
    # transformers 5 names the dtype argument `dtype`; diffusers keeps `torch_dtype`.
    dtype = {"dtype": kwargs["torch_dtype"]} if "torch_dtype" in kwargs else {}
    path = pretrained_model_name_or_path
    return dict(
        video_unet=(unet_class or UNet3DConditionModel).from_pretrained(path, subfolder="unet", **kwargs),
        video_text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **text_kwargs, **dtype),
        video_tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **text_kwargs),
    )


# ---------------------------------------------------------------------- native clip lengths of the video models
# Frames per clip each video model was trained on. AnimateDiff's motion modules accept up to
# `motion_max_seq_length` (32) frames but were trained on 16; ZeroScope v2 576w was tuned from ModelScope on 24.
NATIVE_NUM_FRAMES = {"animatediff": 16, "modelscope": 16, "zeroscope": 24, "vidrd": 8}


def video_model_family(video_unet, name_hint: str | None = None) -> str | None:
    """Which known video model `video_unet` is: a key of `NATIVE_NUM_FRAMES`, or None for an unknown model.

    ModelScope and ZeroScope are both `UNet3DConditionModel`s with the same config (ZeroScope is a fine-tune), so
    only a name tells them apart: `name_hint` (a Hub id or folder), else the `_name_or_path` that `from_pretrained`
    records in the config; a `UNet3DConditionModel` without "zeroscope" in either is taken for ModelScope.
    Classes are compared by name because this module never imports the project's own models.
    """
    kind = type(unwrap_module(video_unet)).__name__
    if kind == "UNetMotionModel":
        return "animatediff"
    if kind == "VidRDUNet3DConditionModel":
        return "vidrd"
    if kind == "UNet3DConditionModel":
        config = getattr(video_unet, "config", {})
        names = f"{name_hint or ''} {config.get('_name_or_path', '') or ''}".lower()
        return "zeroscope" if "zeroscope" in names else "modelscope"
    return None


def native_num_frames(video_unet, name_hint: str | None = None) -> int | None:
    """The clip length `video_unet` was trained on, None when unknown.

    A `native_num_frames` entry in the model's config wins (set it with
    `video_unet.register_to_config(native_num_frames=24)`; it is saved with the model), then the model's family.
    """
    configured = getattr(video_unet, "config", {}).get("native_num_frames")
    if configured is not None:
        return int(configured)
    family = video_model_family(video_unet, name_hint)
    return NATIVE_NUM_FRAMES.get(family)


def video_windows_for_clip(
    num_frames: int,
    native: int | None,
    user_windows: tuple[int, int] | None | str = "native",
    overlap: int = 4,
) -> tuple[int, int] | None:
    """(size, overlap) of the video UNet's temporal windows for a clip of `num_frames`, or None to run it whole.

    `user_windows` is what the user chose: a (size, overlap) pair, None for the whole clip at once, or "native"
    (nothing chosen): then a clip longer than the model's native length runs in windows of that length,
    overlapping by `overlap` frames (at most half a window), and a clip no longer than it runs whole.
    """
    if user_windows != "native":
        return user_windows
    if native is None or num_frames <= native:
        return None
    return native, min(overlap, native // 2)


# ---------------------------------------------------------------------- frame-pooled normalisation
# The original release inverted frames with an SD-1.5 UNet "inflated" to 5-D (Tune-A-Video style): its ResNet norms
# and output norm saw (B, C, F, h, w) tensors, so their GroupNorm statistics span all F frames of a clip, while its
# transformer norms and attention ran per frame. No library offers that on a stock 2-D UNet, so these hooks give a
# `UNet2DConditionModel` the same statistics on frames folded into the batch, without a second copy of its weights.
# Hooks rather than replaced `forward`s, so accelerate's offload wrappers, PEFT layers and dtype casts stay intact.


def frame_pooled_norms(unet: torch.nn.Module) -> list[torch.nn.GroupNorm]:
    """The GroupNorms the inflated UNet pooled over frames: every ResNet's `norm1` and `norm2`, and `conv_norm_out`.

    Transformer blocks' input norms are left out on purpose: the original folded frames into the batch before them.
    """
    from diffusers.models.resnet import ResnetBlock2D

    norms = []
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):
            norms += [module.norm1, module.norm2]
    norms.append(getattr(unet, "conv_norm_out", None))
    return [norm for norm in norms if type(norm) is torch.nn.GroupNorm]


@contextlib.contextmanager
def pool_group_norms_over_frames(unet: torch.nn.Module, num_frames: int):
    """Within the block, `unet` normalises its ResNets and output over each clip's frames, not each frame alone.

    Inputs are frames folded into the batch, `(B * num_frames, C, h, w)`, frame-major within each clip (as
    `fold_frames` makes them; a CFG batch of such clips works too). Pass a window's length to pool over a window.

    ```py
    >>> with pool_group_norms_over_frames(unet, num_frames=8):
    ...     eps = unet(fold_frames(z), t, encoder_hidden_states=cond.expand(8, -1, -1)).sample
    ```
    """
    if num_frames < 1:
        raise ValueError(f"`num_frames` must be at least 1, got {num_frames}.")

    def to_clips(module, args):
        hidden, *rest = args
        if hidden.shape[0] % num_frames:
            raise ValueError(f"A batch of {hidden.shape[0]} frames does not split into clips of {num_frames} frames.")
        # (B * F, C, ...) -> (B, C, F, ...): GroupNorm then reduces over F too, as on the original's 5-D input.
        clips = hidden.unflatten(0, (-1, num_frames)).transpose(1, 2)
        return (clips, *rest)

    def to_frames(module, args, output):
        return output.transpose(1, 2).flatten(0, 1)

    handles = []
    try:
        for norm in frame_pooled_norms(unet):
            handles.append(norm.register_forward_pre_hook(to_clips))
            handles.append(norm.register_forward_hook(to_frames))
        yield
    finally:
        for handle in handles:
            handle.remove()
