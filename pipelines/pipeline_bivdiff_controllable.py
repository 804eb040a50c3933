"""BIVDiff controllable video generation: ControlNet or T2I-Adapter frame by frame, then Mixed Inversion and a
text-to-video model for temporal coherence."""

from __future__ import annotations


import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DiffusionPipeline,
    MultiAdapter,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from .mixed_inversion import (
    FrameInput,
    ImagePromptMixin,
    VideoUNet,
    carries_ip_adapter,
    count_frames,
    is_motion_unet,
    pipeline_call,
)

EXAMPLE_DOC_STRING = """
        >>> import cv2
        >>> import numpy as np
        >>> import torch
        >>> from diffusers import ControlNetModel, DDIMScheduler
        >>> from diffusers.utils import export_to_video, load_video
        >>> from PIL import Image
        >>> from bivdiff import BIVDiffControllablePipeline, load_video_model

        >>> canny = ControlNetModel.from_pretrained("lllyasviel/control_v11p_sd15_canny", torch_dtype=torch.float16)
        >>> zeroscope = load_video_model("cerspense/zeroscope_v2_576w", torch_dtype=torch.float16)
        >>> pipe = BIVDiffControllablePipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5", controlnet=canny, **zeroscope, torch_dtype=torch.float16
        ... )
        >>> pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        >>> pipe.to("cuda")

        >>> source = load_video("bear.mp4")[::4][:8]
        >>> edges = [Image.fromarray(cv2.Canny(np.array(f.resize((512, 512))), 100, 200)).convert("RGB") for f in source]
        >>> video = pipe(
        ...     prompt="A bear walking through a snow mountain",
        ...     conditioning_frames=edges,
        ...     generator=torch.Generator("cuda").manual_seed(42),
        ... ).frames[0]
        >>> export_to_video(video, "bear.mp4", fps=8)

        >>> # Two prompts, two videos of the same motion in one call; one generator per video.
        >>> videos = pipe(
        ...     prompt=["A bear walking through a snow mountain", "A robot walking through a desert"],
        ...     conditioning_frames=edges,
        ...     generator=[torch.Generator("cuda").manual_seed(s) for s in (42, 43)],
        ... ).frames
"""


def as_frame_list(frames: FrameInput) -> list:
    """A video as a list of per-frame items (PIL image, (H, W, C) array or (C, H, W) tensor)."""
    return list(frames)


def adapter_frame(frame, height: int, width: int) -> PIL.Image.Image | torch.Tensor:
    """T2I-Adapter conditions are images in [0, 1]; arrays and tensors become (C, H, W) float tensors at size."""
    if isinstance(frame, PIL.Image.Image):
        return frame
    tensor = torch.from_numpy(np.asarray(frame)) if isinstance(frame, np.ndarray) else frame
    if tensor.ndim == 2:
        tensor = tensor[None]
    elif isinstance(frame, np.ndarray):
        tensor = tensor.permute(2, 0, 1)
    tensor = tensor.float() / 255.0 if not tensor.is_floating_point() else tensor.float()
    if tuple(tensor.shape[-2:]) != (height, width):
        tensor = torch.nn.functional.interpolate(tensor[None], size=(height, width), mode="bilinear")[0]
    return tensor


class BIVDiffControllablePipeline(DiffusionPipeline, ImagePromptMixin):
    r"""
    BIVDiff controllable video generation. Stage 1 runs diffusers' stock `StableDiffusionControlNetPipeline` (or
    `StableDiffusionAdapterPipeline`) over all frames of every video, `frame_batch_size` at a time, one generator
    per frame; stage 2 inverts its latents with the image UNet and the video UNet and mixes them with
    `mixing_ratio`; stage 3 denoises the mix with the video UNet.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler: the SD-1.5 image model (`scheduler` drives stage 1; its
            config also gives the DDIM schedule of smoothing).
        video_unet ([`UNet3DConditionModel`], [`UNetMotionModel`] or `VidRDUNet3DConditionModel`): the
            text-to-video UNet.
        video_text_encoder ([`CLIPTextModel`]), video_tokenizer ([`CLIPTokenizer`]): the video model's text side.
        inverse_scheduler ([`BIVDiffDDIMInverseScheduler`] or [`DDIMInverseScheduler`], *optional*): the inversion
            step; by default the original's, built from `scheduler.config`.
        controlnet ([`ControlNetModel`] or [`MultiControlNetModel`], *optional*): exactly one of `controlnet` and
            `adapter`.
        adapter ([`T2IAdapter`] or [`MultiAdapter`], *optional*).
        inversion_unet ([`UNet2DConditionModel`], *optional*): inverts frame by frame instead of `unet`.
        image_encoder ([`CLIPVisionModelWithProjection`], *optional*), feature_extractor ([`CLIPImageProcessor`],
            *optional*): the image side of an IP-Adapter (`load_ip_adapter` adds them); with `controlnet` only.
    """

    model_cpu_offload_seq = (
        "text_encoder->image_encoder->video_text_encoder->controlnet->adapter->unet->inversion_unet->video_unet->vae"
    )
    _optional_components = [
        "controlnet", "adapter", "inversion_unet", "inverse_scheduler", "image_encoder", "feature_extractor"
    ]
    # With `control_smoothing`, during one call's inversion and smoothing: (condition frames per ControlNet, scale).
    _smoothing_control = None

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        video_unet: VideoUNet,
        video_text_encoder: CLIPTextModel,
        video_tokenizer: CLIPTokenizer,
        scheduler: KarrasDiffusionSchedulers,
        inverse_scheduler: SchedulerMixin | None = None,
        controlnet: ControlNetModel | MultiControlNetModel | list[ControlNetModel] | None = None,
        adapter: T2IAdapter | MultiAdapter | list[T2IAdapter] | None = None,
        inversion_unet: UNet2DConditionModel | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
    ):
        super().__init__(
            vae, text_encoder, tokenizer, unet, video_unet, video_text_encoder, video_tokenizer, scheduler,
            inverse_scheduler, inversion_unet, image_encoder, feature_extractor,
        )  # fmt: skip
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        if isinstance(adapter, (list, tuple)):
            adapter = MultiAdapter(adapter)
        self.register_modules(controlnet=controlnet, adapter=adapter)

    # ------------------------------------------------------------------ stage 1
    @property
    def num_conditions(self) -> int:
        control = self.controlnet if self.controlnet is not None else self.adapter
        if isinstance(control, MultiControlNetModel):
            return len(control.nets)
        if isinstance(control, MultiAdapter):
            return len(control.adapters)
        return 1

    def condition_videos(self, call) -> list:
        """One video per ControlNet/adapter (a single model takes a video, several take a list of videos), at the
        output size; resized once per call, for stage 1 and for smoothing with `control_smoothing`."""
        if getattr(call, "sized_conditions", None) is None:
            frames = call.conditioning_frames
            videos = [frames] if self.num_conditions == 1 else frames
            call.sized_conditions = [
                self.resize_frames(as_frame_list(video), call.height, call.width, call.resize_mode) for video in videos
            ]
        return call.sized_conditions

    def input_frames(self, call):
        frames = call.conditioning_frames
        if frames is not None and self.num_conditions > 1 and isinstance(frames, (list, tuple)) and frames:
            return frames[0]
        return frames

    def generate_frames(self, call, embeds) -> torch.Tensor:
        """Stage 1: ControlNet / T2I-Adapter on every frame of every video; the same condition frame for frame f
        of each video."""
        videos = self.condition_videos(call)
        if self.controlnet is not None:
            pipe = self.stock_pipeline(
                StableDiffusionControlNetPipeline, "Frame-wise generation (ControlNet)", controlnet=self.controlnet
            )

            def frame_inputs(frames):
                if self.num_conditions == 1:
                    return {"image": [videos[0][f] for f in frames]}
                return {"image": [[video[f] for video in videos] for f in frames]}

            control = dict(
                controlnet_conditioning_scale=call.controlnet_conditioning_scale,
                guess_mode=call.guess_mode,
                control_guidance_start=call.control_guidance_start,
                control_guidance_end=call.control_guidance_end,
            )
        else:
            pipe = self.stock_pipeline(
                StableDiffusionAdapterPipeline, "Frame-wise generation (T2I-Adapter)", adapter=self.adapter
            )

            def frame_inputs(frames):
                images = [[adapter_frame(v[f], call.height, call.width) for f in frames] for v in videos]
                return {"image": images[0] if self.num_conditions == 1 else images}

            control = {"adapter_conditioning_scale": call.adapter_conditioning_scale}
        size = dict(height=call.height, width=call.width)
        return self.run_frame_batches(pipe, call, embeds, frame_inputs, **size, **control)

    # ------------------------------------------------------------------ stage 3 with `control_smoothing`
    def invert_and_smooth(self, latents: torch.Tensor, call, embeds) -> torch.Tensor:
        if call.control_smoothing:
            # The condition frames as stage 1's ControlNet pipeline prepares them ([0, 1], at the output size).
            pipe = self.stock_pipeline(StableDiffusionControlNetPipeline, controlnet=self.controlnet)
            device, dtype = latents.device, self.controlnet.dtype
            conditions = [
                pipe.prepare_image(video, call.width, call.height, count_frames(video), 1, device, dtype)
                for video in self.condition_videos(call)
            ]
            self._smoothing_control = (conditions, call.controlnet_conditioning_scale)
        try:
            return super().invert_and_smooth(latents, call, embeds)
        finally:
            self._smoothing_control = None

    def video_unet_residuals(self, sample: torch.Tensor, timestep, encoder_hidden_states, frames: slice) -> dict:
        """With `control_smoothing`, the ControlNet's residuals for the motion UNet while it smooths, as diffusers'
        `AnimateDiffControlNetPipeline` adds them: every video's frames folded into the batch, each read with its
        condition frame. The video branch of the inversion stays the original's, without them."""
        if self._smoothing_control is None or self.current_stage != "temporal smoothing":
            return {}
        conditions, scale = self._smoothing_control
        num_videos, num_frames = sample.shape[0], sample.shape[2]
        dtype = self.controlnet.dtype
        images = [condition[frames].repeat(num_videos, 1, 1, 1) for condition in conditions]
        down, mid = self.controlnet(
            sample.transpose(1, 2).flatten(0, 1).to(dtype),
            timestep,
            encoder_hidden_states=encoder_hidden_states.repeat_interleave(num_frames, dim=0).to(dtype),
            controlnet_cond=images if self.num_conditions > 1 else images[0],
            conditioning_scale=scale,
            return_dict=False,
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    # ------------------------------------------------------------------ checks
    def check_inputs(self, call):
        if (self.controlnet is None) == (self.adapter is None):
            raise ValueError(
                "BIVDiffControllablePipeline needs exactly one of `controlnet` and `adapter`; got "
                + ("both." if self.controlnet is not None else "neither.")
            )
        if self.controlnet is not None:
            check_control_guidance(call.control_guidance_start, call.control_guidance_end, self.num_conditions)
        elif call.guess_mode or call.control_guidance_start != 0.0 or call.control_guidance_end != 1.0:
            raise ValueError(
                "`guess_mode`, `control_guidance_start` and `control_guidance_end` are ControlNet's: diffusers' "
                "StableDiffusionAdapterPipeline, which runs stage 1 with a T2I-Adapter, takes none of them."
            )
        if call.control_smoothing:
            self.check_control_smoothing(call)
        image_prompt = call.ip_adapter_image is not None or call.ip_adapter_image_embeds is not None
        if self.adapter is not None and (image_prompt or carries_ip_adapter(self.unet)):
            raise ValueError(
                "An IP-Adapter works here with `controlnet` only: diffusers' StableDiffusionAdapterPipeline, which "
                "runs stage 1 with a T2I-Adapter, takes no image prompt."
            )
        if call.prompt_embeds is None and (
            not isinstance(call.prompt, (str, list, tuple)) or not all(str(p).strip() for p in as_prompts(call.prompt))
        ):
            raise ValueError("`prompt` must be a non-empty string (or list of strings) describing the frames.")
        frames = call.conditioning_frames
        if frames is None:
            raise ValueError(
                "`conditioning_frames` is required: one condition image per frame (depth, canny, pose...)."
            )
        if self.num_conditions > 1 and (not isinstance(frames, (list, tuple)) or len(frames) != self.num_conditions):
            raise ValueError(
                f"With {self.num_conditions} ControlNets/adapters, `conditioning_frames` must be a list of "
                f"{self.num_conditions} condition videos."
            )
        counts = [count_frames(v) for v in (frames if self.num_conditions > 1 else [frames])]
        expected = call.num_frames if call.num_frames_given is None else call.num_frames_given
        if expected == 0 or any(c != expected for c in counts):
            raise ValueError(
                f"`conditioning_frames` must hold one condition image per frame: expected {expected} frames, got "
                f"{counts if len(counts) > 1 else counts[0]}."
            )
        self.check_image_model((self.vae.config.latent_channels,), "an SD-1.5 text-to-image UNet")

    def check_control_smoothing(self, call):
        if self.controlnet is None or not is_motion_unet(self.video_unet):
            raise ValueError(
                "`control_smoothing=True` needs a `controlnet` and an AnimateDiff `video_unet` (`UNetMotionModel`): "
                "only a video UNet built on SD-1.5's blocks takes a ControlNet's residuals."
            )
        if call.guess_mode:
            raise ValueError(
                "`control_smoothing=True` takes no `guess_mode`: temporal smoothing reads the ControlNet as "
                "diffusers' AnimateDiffControlNetPipeline does, with the prompt."
            )
        nets = self.controlnet.nets if isinstance(self.controlnet, MultiControlNetModel) else [self.controlnet]
        width = self.video_text_encoder.config.hidden_size
        if any(net.config.cross_attention_dim != width for net in nets):
            raise ValueError(
                f"`control_smoothing=True` feeds the video prompt's embeddings ({width} wide) to the ControlNet, "
                f"which takes {nets[0].config.cross_attention_dim}: use a video text encoder of the ControlNet's "
                "width."
            )

    # ------------------------------------------------------------------ call
    @pipeline_call(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        conditioning_frames: FrameInput | list[FrameInput] | None = None,
        num_frames: int | None = None,
        mixing_ratio: float = 1.0,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        adapter_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        control_smoothing: bool = False,
        **shared,
    ):
        r"""
        Generate videos that follow a condition video (depth, edges, pose...) and a prompt.

        Args:
            prompt (`str` or `list[str]`): The image model's prompt for every frame; N prompts give N videos of the
                same condition video in one call.
            conditioning_frames (`list[PIL.Image.Image]`, `np.ndarray` `(F, H, W, C)` or `torch.Tensor`
                `(F, C, H, W)` in [0, 1]): One condition image per frame; with several ControlNets/adapters, a
                list of such videos. Resized by the stock pipeline to the output size.
            num_frames (`int`, *optional*): Checked against the number of condition frames when given.
            controlnet_conditioning_scale (`float` or `list[float]`, defaults to 1.0): As in diffusers.
            adapter_conditioning_scale (`float` or `list[float]`, defaults to 1.0): As in diffusers.
            guess_mode (`bool`, defaults to `False`): As in diffusers: the ControlNet reads the condition alone,
                without the prompt (a `guidance_scale` of 3 to 5 suits it). ControlNet only.
            control_guidance_start, control_guidance_end (`float` or `list[float]`, defaults to 0.0 and 1.0): As in
                diffusers: the fractions of stage 1's steps between which each ControlNet acts, one number for all or
                one per ControlNet. ControlNet only.
            control_smoothing (`bool`, defaults to `False`): Also guide temporal smoothing with the ControlNet, at
                every smoothing step with `controlnet_conditioning_scale`, as diffusers'
                `AnimateDiffControlNetPipeline` does (the guidance window is stage 1's; no `guess_mode`). Needs an
                AnimateDiff `video_unet`. An addition: the original smooths from the video prompt alone.
            return_idm_frames (`bool`, defaults to `True`): Also decode and return the image model's frames.

        Examples:

        Returns:
            [`BIVDiffPipelineOutput`] or `tuple` `(frames, idm_frames)`.
        """
        return self.run(locals())


def check_control_guidance(start, end, num_controlnets: int):
    """`control_guidance_start` / `end` as diffusers' ControlNet pipeline reads them: a number for every ControlNet or
    one per ControlNet, with 0 <= start < end <= 1."""
    starts = list(start) if isinstance(start, (list, tuple)) else [start] * num_controlnets
    ends = list(end) if isinstance(end, (list, tuple)) else [end] * num_controlnets
    if len(starts) != num_controlnets or len(ends) != num_controlnets:
        raise ValueError(
            f"`control_guidance_start` and `control_guidance_end` take a number, or a list of one per ControlNet "
            f"({num_controlnets}); got {start!r} and {end!r}."
        )
    if not all(0.0 <= s < e <= 1.0 for s, e in zip(starts, ends)):
        raise ValueError(
            f"`control_guidance_start` and `control_guidance_end` are fractions of the steps with 0 <= start < end "
            f"<= 1; got {start!r} and {end!r}."
        )


def as_prompts(prompt) -> list:
    return [prompt] if isinstance(prompt, str) else list(prompt)
