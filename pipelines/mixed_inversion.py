"""Stages 2 and 3 of BIVDiff, shared by every pipeline: Mixed Inversion and video temporal smoothing.

This module is copied next to a pipeline file when diffusers loads it as a `custom_pipeline`, so it imports only
installed libraries (no relative imports) and defines no `DiffusionPipeline` subclass.

Layouts: a latent video is (B, C, F, h, w); an image UNet sees frames folded into the batch, (B * F, C, h, w).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import DDIMScheduler
from diffusers.utils import BaseOutput

FrameInput = list[PIL.Image.Image] | np.ndarray | torch.Tensor
OUTPUT_TYPES = ("np", "pt", "pil", "latent")


@dataclass
class BIVDiffPipelineOutput(BaseOutput):
    r"""
    Output of every BIVDiff pipeline.

    Args:
        frames (`np.ndarray`, `torch.Tensor` or `list[list[PIL.Image.Image]]`):
            The final, temporally smoothed video; layouts as in diffusers' video pipelines: np `(B, F, H, W, 3)` in
            [0, 1], pt `(B, F, 3, H, W)` in [0, 1], pil a list (per video) of lists of frames, latent
            `(B, 4, F, h, w)`.
        idm_frames (same type as `frames`, or `None`):
            The frame-wise image-model result that was inverted (`None` when not asked for).
    """

    frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]]
    idm_frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]] | None = None


def fold_frames(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, h, w) -> (B * F, C, h, w), frame-major within each video."""
    b, c, f, h, w = latents.shape
    return latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def unfold_frames(latents: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B * F, C, h, w) -> (B, C, F, h, w); inverse of `fold_frames`."""
    bf, c, h, w = latents.shape
    return latents.reshape(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)


def frame_generators(
    generator: torch.Generator | list[torch.Generator] | None, num_frames: int
) -> list[torch.Generator] | None:
    """One generator per frame: the list as given, or F derived deterministically from a single generator.

    Derived seeds come from the parent generator, so the same seed always yields the same frames whether the
    frames are then processed in one batch or one at a time.
    """
    if generator is None:
        return None
    if isinstance(generator, list):
        if len(generator) != num_frames:
            raise ValueError(f"`generator` is a list of {len(generator)}; pass one per frame ({num_frames}).")
        return generator
    seeds = torch.randint(0, 2**62, (num_frames,), generator=generator, device=generator.device).tolist()
    return [torch.Generator(device=generator.device).manual_seed(int(s)) for s in seeds]


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


def text_width(text_encoder) -> int:
    return text_encoder.config.hidden_size


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


class MixedInversionMixin:
    r"""
    Mixed Inversion (stage 2) and temporal smoothing (stage 3) of BIVDiff, for a pipeline that registers `vae`,
    `text_encoder`, `tokenizer`, `unet` (or `inversion_unet`), `video_unet`, `video_text_encoder`,
    `video_tokenizer`, `scheduler` and `inverse_scheduler`.

    Mixed Inversion DDIM-inverts the clean latents twice, with the image UNet frame by frame and with the video
    UNet on the whole clip, and mixes the two noises: `z_T = r * z_T(image) + (1 - r) * z_T(video)`. A branch whose
    weight is zero is not run. Smoothing denoises `z_T` with the video UNet (DDIM, eta 0, batched CFG).
    """

    # ------------------------------------------------------------------ properties (diffusers conventions)
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8

    @property
    def image_inversion_unet(self):
        """The UNet that inverts frame by frame: `inversion_unet` when set, else the IDM's own `unet`."""
        return getattr(self, "inversion_unet", None) or getattr(self, "unet", None)

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
        self._video_windows = None

    def video_noise_prediction(
        self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """The video UNet's output on (B, C, F, h, w), whole clip or blended over temporal windows."""
        size, overlap = getattr(self, "_video_windows", None) or (None, 0)
        windows = temporal_windows(sample.shape[2], size, overlap)
        if len(windows) == 1:
            return self.video_unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
        total = torch.zeros_like(sample, dtype=torch.float32)
        norm = torch.zeros(sample.shape[2], device=sample.device)
        for i, (start, stop) in enumerate(windows):
            weights = window_weights(stop - start, overlap, i == 0, i == len(windows) - 1).to(sample.device)
            out = self.video_unet(
                sample[:, :, start:stop], timestep, encoder_hidden_states=encoder_hidden_states
            ).sample
            total[:, :, start:stop] += out.float() * weights.view(1, 1, -1, 1, 1)
            norm[start:stop] += weights
        return (total / norm.view(1, 1, -1, 1, 1)).to(sample.dtype)

    # ------------------------------------------------------------------ stages
    def begin_call(self):
        """Resets per-call state; every `__call__` starts with it."""
        self._interrupt = False
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

    def stage_progress_bar(self, total: int, desc: str):
        """`self.progress_bar` labelled with the stage's name, unless the user set a label."""
        config = getattr(self, "_progress_bar_config", {})
        self._progress_bar_config = {"desc": desc, **config}
        try:
            return self.progress_bar(total=total)
        finally:
            self._progress_bar_config = config

    # ------------------------------------------------------------------ checks
    def check_mixed_inversion_inputs(self, height, width, mixing_ratio, num_inference_steps, num_inversion_steps):
        """Checks shared by every pipeline; raise before any model runs."""
        if height % 8 != 0 or width % 8 != 0:
            raise ValueError(
                f"`height` and `width` must be divisible by 8, got {height}x{width}; "
                f"use {height // 8 * 8}x{width // 8 * 8}."
            )
        if not 0.0 <= mixing_ratio <= 1.0:
            raise ValueError(
                f"`mixing_ratio` must be in [0, 1] (1 = image-model inversion only, 0 = video-model only), "
                f"got {mixing_ratio}."
            )
        for name, steps in (
            ("num_inference_steps", num_inference_steps),
            ("num_inversion_steps", num_inversion_steps),
        ):
            if not isinstance(steps, int) or steps < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {steps!r}.")
        if self.inverse_scheduler is None:
            raise ValueError(
                "This pipeline has no `inverse_scheduler`; pass one to `from_pretrained`, or add it with "
                "`pipe.register_modules(inverse_scheduler=BIVDiffDDIMInverseScheduler.from_config(pipe.scheduler.config))`."
            )
        self.check_video_components()
        if mixing_ratio > 0:
            self.check_image_inversion_components()

    def check_call_options(self, frame_batch_size, decode_chunk_size, output_type, callback_on_step_end_tensor_inputs):
        """Checks of the options every pipeline's `__call__` shares."""
        for name, value in (("frame_batch_size", frame_batch_size), ("decode_chunk_size", decode_chunk_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if callback_on_step_end_tensor_inputs is not None and any(
            k not in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}.")

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
                "`inversion_unet` (an SD-1.5 UNet2DConditionModel), or set `mixing_ratio=0`."
            )
        if unet.config.cross_attention_dim != text_width(self.text_encoder):
            raise ValueError(
                f"The image inversion UNet expects text embeddings of width {unet.config.cross_attention_dim} but "
                f"`text_encoder` produces {text_width(self.text_encoder)}."
            )

    # ------------------------------------------------------------------ prompts
    @staticmethod
    def encode_text(text: str | list[str], tokenizer, text_encoder, device) -> torch.Tensor:
        """CLIP embeddings of `text`, padded to the tokenizer's maximum length, as every SD-family pipeline does."""
        text = [text] if isinstance(text, str) else list(text)
        ids = tokenizer(
            text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            mask = (ids != tokenizer.pad_token_id).long()
        return text_encoder(ids, attention_mask=mask)[0]

    def encode_video_prompt(
        self, prompt: str, negative_prompt: str | None, device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative, positive) embeddings of the video text encoder, encoded in one call."""
        embeds = self.encode_text(
            [negative_prompt or "", prompt], self.video_tokenizer, self.video_text_encoder, device
        )
        return embeds[:1], embeds[1:]

    def encode_image_prompt(
        self, prompt: str, negative_prompt: str | None, device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative, positive) embeddings of the image text encoder, encoded in one call."""
        embeds = self.encode_text([negative_prompt or "", prompt], self.tokenizer, self.text_encoder, device)
        return embeds[:1], embeds[1:]

    # ------------------------------------------------------------------ VAE
    def source_pixels(self, video: FrameInput, height: int, width: int) -> torch.Tensor:
        """Source frames as a (F, 3, H, W) tensor in [0, 1] at the output size: resized like the VAE's input but
        not normalised, because the stock image pipelines normalise what they are given and paste-back needs the
        exact source pixels."""
        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_convert_rgb=True)
        return processor.preprocess(video, height=height, width=width)

    def encode_frames(
        self,
        frames: FrameInput,
        height: int,
        width: int,
        chunk_size: int,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Frames -> scaled latents (1, C, F, h, w), `chunk_size` frames per VAE call.

        Uses the posterior mean unless a generator is given (the original drew an unseeded sample).
        """
        device = self._execution_device
        num_frames = count_frames(frames)
        pixels = self.video_processor.preprocess(frames, height=height, width=width)
        generators = frame_generators(generator, num_frames)
        latents = []
        with self.stage("VAE encoding"):
            for start in range(0, num_frames, chunk_size):
                chunk = pixels[start : start + chunk_size].to(device=device, dtype=self.vae.dtype)
                dist = self.vae.encode(chunk).latent_dist
                if generators is None:
                    latents.append(dist.mode())
                else:
                    latents.append(dist.sample(generator=generators[start : start + chunk_size]))
        latents = torch.cat(latents) * self.vae.config.scaling_factor
        return unfold_frames(latents, num_frames)

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

    # ------------------------------------------------------------------ stage 2
    def invert_image_branch(
        self, latents: torch.Tensor, cond: torch.Tensor, num_steps: int, frame_batch_size: int
    ) -> torch.Tensor:
        """DDIM-invert (B, C, F, h, w) latents with the image UNet, frames folded into the batch."""
        unet = self.image_inversion_unet
        num_frames = latents.shape[2]
        z = fold_frames(latents).to(unet.dtype)
        cond = cond.to(unet.dtype)
        self.inverse_scheduler.set_timesteps(num_steps, device=z.device)
        with (
            self.stage("image inversion"),
            self.stage_progress_bar(num_steps, "Mixed inversion (image UNet)") as progress_bar,
        ):
            for t in self.inverse_scheduler.timesteps:
                chunks = []
                for start in range(0, z.shape[0], frame_batch_size):
                    chunk = z[start : start + frame_batch_size]
                    eps = unet(chunk, t, encoder_hidden_states=cond.expand(chunk.shape[0], -1, -1)).sample
                    chunks.append(self.inverse_scheduler.step(eps, t, chunk).prev_sample)
                z = torch.cat(chunks)
                progress_bar.update()
        return unfold_frames(z, num_frames)

    def invert_video_branch(self, latents: torch.Tensor, cond: torch.Tensor, num_steps: int) -> torch.Tensor:
        """DDIM-invert (B, C, F, h, w) latents with the video UNet on the whole clip."""
        unet = self.video_unet
        z = latents.to(unet.dtype)
        cond = cond.to(unet.dtype).expand(z.shape[0], -1, -1)
        self.inverse_scheduler.set_timesteps(num_steps, device=z.device)
        with (
            self.stage("video inversion"),
            self.stage_progress_bar(num_steps, "Mixed inversion (video UNet)") as progress_bar,
        ):
            for t in self.inverse_scheduler.timesteps:
                eps = self.video_noise_prediction(z, t, cond)
                z = self.inverse_scheduler.step(eps, t, z).prev_sample
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
    ) -> torch.Tensor:
        """z_T = r * invert_image(z_0) + (1 - r) * invert_video(z_0), computed in fp32, no renormalisation."""
        mixed = torch.zeros_like(latents, dtype=torch.float32)
        if mixing_ratio > 0:
            z_img = self.invert_image_branch(latents, image_cond, num_inversion_steps, frame_batch_size)
            mixed = mixed + mixing_ratio * z_img.float()
        if mixing_ratio < 1:
            z_vid = self.invert_video_branch(latents, video_cond, num_inversion_steps)
            mixed = mixed + (1 - mixing_ratio) * z_vid.float()
        return mixed

    # ------------------------------------------------------------------ stage 3
    def smoothing_scheduler(self) -> DDIMScheduler:
        """A DDIM scheduler (eta 0) with the pipeline scheduler's betas, whatever sampler stage 1 uses.

        `clip_sample` is always off: latents are not bounded to [-1, 1], and configs of other samplers (PNDM,
        Euler) often omit the key, which would turn on DDIM's default clipping. A missing `set_alpha_to_one`
        means SD's False (the last step lands on alphas_cumprod[0], as in the original).
        """
        config = {"set_alpha_to_one": False, **self.scheduler.config}
        return DDIMScheduler.from_config(config, clip_sample=False)

    def temporal_smoothing(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> torch.Tensor:
        """Denoise the mixed noise (B, C, F, h, w) with the video UNet: DDIM, eta 0, CFG in one batched call."""
        unet = self.video_unet
        scheduler = self.smoothing_scheduler()
        scheduler.set_timesteps(num_inference_steps, device=latents.device)
        timesteps = scheduler.timesteps
        self._guidance_scale = guidance_scale
        self._num_timesteps = len(timesteps)
        latents = latents.to(unet.dtype) * scheduler.init_noise_sigma
        batch = latents.shape[0]

        with (
            self.stage("temporal smoothing"),
            self.stage_progress_bar(len(timesteps), "Temporal smoothing (video UNet)") as progress_bar,
        ):
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                if self.do_classifier_free_guidance:
                    model_in = torch.cat([latents, latents])
                    embeds = torch.cat(
                        [negative_prompt_embeds.expand(batch, -1, -1), prompt_embeds.expand(batch, -1, -1)]
                    )
                else:
                    model_in, embeds = latents, prompt_embeds.expand(batch, -1, -1)
                model_in = scheduler.scale_model_input(model_in, t)
                noise_pred = self.video_noise_prediction(model_in, t, embeds.to(unet.dtype))
                if self.do_classifier_free_guidance:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
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
    def invert_and_smooth(
        self,
        latents: torch.Tensor,
        *,
        video_prompt: str,
        negative_prompt: str | None,
        inversion_prompt: str | None,
        mixing_ratio: float,
        num_inference_steps: int,
        num_inversion_steps: int,
        video_guidance_scale: float,
        frame_batch_size: int,
        image_negative_embeds: torch.Tensor | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ) -> torch.Tensor:
        """Stages 2 and 3 on clean latents (B, C, F, h, w); returns the smoothed latents.

        The inversion is conditioned on the negative prompt (as in the original), or on `inversion_prompt` when
        given. `image_negative_embeds` lets a caller reuse the image encoder's negative embedding it already has.
        """
        device = latents.device
        negative_embeds, prompt_embeds = self.encode_video_prompt(video_prompt, negative_prompt, device)
        video_cond = negative_embeds
        if inversion_prompt is not None and mixing_ratio < 1:
            video_cond = self.encode_text(inversion_prompt, self.video_tokenizer, self.video_text_encoder, device)
        image_cond = None
        if mixing_ratio > 0:
            if inversion_prompt is None and image_negative_embeds is not None:
                image_cond = image_negative_embeds
            else:
                text = inversion_prompt if inversion_prompt is not None else (negative_prompt or "")
                image_cond = self.encode_text(text, self.tokenizer, self.text_encoder, device)

        noise = self.mixed_inversion(
            latents, mixing_ratio, num_inversion_steps, frame_batch_size, image_cond, video_cond
        )
        return self.temporal_smoothing(
            noise,
            prompt_embeds,
            negative_embeds,
            num_inference_steps,
            video_guidance_scale,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )


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
