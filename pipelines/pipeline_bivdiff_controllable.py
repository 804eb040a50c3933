"""BIVDiff controllable video generation: ControlNet or T2I-Adapter frame by frame, then Mixed Inversion and a
text-to-video model for temporal coherence."""

from __future__ import annotations

from typing import Callable

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
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import replace_example_docstring
from diffusers.video_processor import VideoProcessor
from transformers import CLIPTextModel, CLIPTokenizer

from .mixed_inversion import (
    BIVDiffPipelineOutput,
    FrameInput,
    MixedInversionMixin,
    count_frames,
    fold_frames,
    frame_generators,
    frame_size,
    unfold_frames,
)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import cv2
        >>> import numpy as np
        >>> import torch
        >>> from diffusers import ControlNetModel, DDIMScheduler, UNet3DConditionModel
        >>> from diffusers.utils import export_to_video, load_video
        >>> from PIL import Image
        >>> from transformers import CLIPTextModel, CLIPTokenizer
        >>> from bivdiff import BIVDiffControllablePipeline, BIVDiffDDIMInverseScheduler

        >>> zeroscope = "cerspense/zeroscope_v2_576w"
        >>> pipe = BIVDiffControllablePipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5",
        ...     controlnet=ControlNetModel.from_pretrained("lllyasviel/control_v11p_sd15_canny", torch_dtype=torch.float16),
        ...     video_unet=UNet3DConditionModel.from_pretrained(zeroscope, subfolder="unet", torch_dtype=torch.float16),
        ...     video_text_encoder=CLIPTextModel.from_pretrained(zeroscope, subfolder="text_encoder", torch_dtype=torch.float16),
        ...     video_tokenizer=CLIPTokenizer.from_pretrained(zeroscope, subfolder="tokenizer"),
        ...     inverse_scheduler=BIVDiffDDIMInverseScheduler.from_pretrained(
        ...         "stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="scheduler"
        ...     ),
        ...     torch_dtype=torch.float16,
        ... )
        >>> pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        >>> pipe.to("cuda")

        >>> source = load_video("bear.mp4")[::4][:8]
        >>> edges = [Image.fromarray(cv2.Canny(np.array(f.resize((512, 512))), 100, 200)).convert("RGB") for f in source]
        >>> video = pipe(
        ...     prompt="A bear walking through a snow mountain",
        ...     control_frames=edges,
        ...     generator=torch.Generator("cuda").manual_seed(42),
        ... ).frames[0]
        >>> export_to_video(video, "bear.mp4", fps=8)
        ```
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


class BIVDiffControllablePipeline(DiffusionPipeline, MixedInversionMixin):
    r"""
    BIVDiff controllable video generation. Stage 1 runs diffusers' stock `StableDiffusionControlNetPipeline` (or
    `StableDiffusionAdapterPipeline`) over all frames, `frame_batch_size` at a time, one generator per frame;
    stage 2 inverts its latents with the image UNet and the video UNet and mixes them with `mixing_ratio`;
    stage 3 denoises the mix with the video UNet.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler: the SD-1.5 image model (`scheduler` drives stage 1; its
            config also gives the DDIM schedule of smoothing).
        controlnet ([`ControlNetModel`] or [`MultiControlNetModel`], *optional*): exactly one of `controlnet` and
            `adapter`.
        adapter ([`T2IAdapter`] or [`MultiAdapter`], *optional*).
        video_unet ([`UNet3DConditionModel`] or `VidRDUNet3DConditionModel`): the text-to-video UNet.
        video_text_encoder ([`CLIPTextModel`]), video_tokenizer ([`CLIPTokenizer`]): the video model's text side.
        inverse_scheduler ([`BIVDiffDDIMInverseScheduler`] or [`DDIMInverseScheduler`]): the inversion step.
        inversion_unet ([`UNet2DConditionModel`], *optional*): inverts frame by frame instead of `unet`.
    """

    model_cpu_offload_seq = "text_encoder->video_text_encoder->unet->inversion_unet->video_unet->vae"
    _optional_components = ["controlnet", "adapter", "inversion_unet"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        video_unet: ModelMixin,
        video_text_encoder: CLIPTextModel,
        video_tokenizer: CLIPTokenizer,
        scheduler: KarrasDiffusionSchedulers,
        inverse_scheduler: SchedulerMixin,
        controlnet: ControlNetModel | MultiControlNetModel | list[ControlNetModel] | None = None,
        adapter: T2IAdapter | MultiAdapter | list[T2IAdapter] | None = None,
        inversion_unet: UNet2DConditionModel | None = None,
    ):
        super().__init__()
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        if isinstance(adapter, (list, tuple)):
            adapter = MultiAdapter(adapter)
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
            controlnet=controlnet,
            adapter=adapter,
            inversion_unet=inversion_unet,
        )
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ stage 1
    @property
    def num_conditions(self) -> int:
        control = self.controlnet if self.controlnet is not None else self.adapter
        if isinstance(control, MultiControlNetModel):
            return len(control.nets)
        if isinstance(control, MultiAdapter):
            return len(control.adapters)
        return 1

    def condition_videos(self, control_frames) -> list[list]:
        """One list of frames per ControlNet/adapter: a single model takes a video, several take a list of videos."""
        if self.num_conditions == 1:
            return [as_frame_list(control_frames)]
        return [as_frame_list(video) for video in control_frames]

    def image_pipeline(self) -> StableDiffusionControlNetPipeline | StableDiffusionAdapterPipeline:
        """The stock diffusers image pipeline, built from this pipeline's own components (no copies)."""
        common = dict(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        if self.controlnet is not None:
            pipe, name = StableDiffusionControlNetPipeline(controlnet=self.controlnet, **common), "ControlNet"
        else:
            pipe, name = StableDiffusionAdapterPipeline(adapter=self.adapter, **common), "T2I-Adapter"
        config = dict(getattr(self, "_progress_bar_config", {}))
        config.setdefault("desc", f"Frame-wise generation ({name})")
        pipe.set_progress_bar_config(**config)
        return pipe

    def generate_frames(
        self,
        condition_videos: list[list],
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        conditioning_scale: float | list[float],
        frame_batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        cross_attention_kwargs: dict | None,
    ) -> torch.Tensor:
        """Stage 1: the image model on every frame, in chunks; returns scaled latents (1, 4, F, h, w)."""
        num_frames = len(condition_videos[0])
        generators = frame_generators(generator, num_frames)
        noise = fold_frames(latents) if latents is not None else None
        pipe = self.image_pipeline()
        chunks = []
        for start in range(0, num_frames, frame_batch_size):
            stop = min(start + frame_batch_size, num_frames)
            n = stop - start
            kwargs = dict(
                prompt_embeds=prompt_embeds.expand(n, -1, -1),
                negative_prompt_embeds=negative_prompt_embeds.expand(n, -1, -1),
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators[start:stop] if generators is not None else None,
                latents=noise[start:stop] if noise is not None else None,
                cross_attention_kwargs=cross_attention_kwargs,
                output_type="latent",
            )
            if self.controlnet is not None:
                if self.num_conditions == 1:
                    image = condition_videos[0][start:stop]
                else:
                    image = [[video[i] for video in condition_videos] for i in range(start, stop)]
                chunks.append(pipe(image=image, controlnet_conditioning_scale=conditioning_scale, **kwargs).images)
            else:
                images = [[adapter_frame(f, height, width) for f in v[start:stop]] for v in condition_videos]
                image = images[0] if self.num_conditions == 1 else images
                chunks.append(pipe(image=image, adapter_conditioning_scale=conditioning_scale, **kwargs).images)
        return unfold_frames(torch.cat(chunks), num_frames)

    # ------------------------------------------------------------------ checks
    def check_inputs(
        self,
        prompt,
        control_frames,
        num_frames,
        latents,
        height,
        width,
        mixing_ratio,
        num_inference_steps,
        num_inversion_steps,
        frame_batch_size,
        decode_chunk_size,
        output_type,
        callback_on_step_end_tensor_inputs,
    ):
        if (self.controlnet is None) == (self.adapter is None):
            raise ValueError(
                "BIVDiffControllablePipeline needs exactly one of `controlnet` and `adapter`; got "
                + ("both." if self.controlnet is not None else "neither.")
            )
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("`prompt` must be a non-empty string describing the frames to generate.")
        if control_frames is None:
            raise ValueError("`control_frames` is required: one condition image per frame (depth, canny, pose...).")
        if self.num_conditions > 1 and (
            not isinstance(control_frames, (list, tuple)) or len(control_frames) != self.num_conditions
        ):
            raise ValueError(
                f"With {self.num_conditions} ControlNets/adapters, `control_frames` must be a list of "
                f"{self.num_conditions} condition videos."
            )
        videos = control_frames if self.num_conditions > 1 else [control_frames]
        counts = [count_frames(v) for v in videos]
        expected = num_frames if num_frames is not None else counts[0]
        if latents is not None:
            if latents.ndim != 5:
                raise ValueError(f"`latents` must be (1, 4, F, h, w) noise, got shape {tuple(latents.shape)}.")
            expected = num_frames if num_frames is not None else latents.shape[2]
            if latents.shape[2] != expected:
                raise ValueError(f"`latents` has {latents.shape[2]} frames but `num_frames` is {expected}.")
        if expected == 0 or any(c != expected for c in counts):
            raise ValueError(
                f"`control_frames` must hold one condition image per frame: expected {expected} frames, got "
                f"{counts if len(counts) > 1 else counts[0]}."
            )
        if self.unet.config.cross_attention_dim != self.text_encoder.config.hidden_size:
            raise ValueError(
                f"`unet` expects text embeddings of width {self.unet.config.cross_attention_dim} but `text_encoder` "
                f"produces {self.text_encoder.config.hidden_size}."
            )
        self.check_call_options(frame_batch_size, decode_chunk_size, output_type, callback_on_step_end_tensor_inputs)
        self.check_mixed_inversion_inputs(height, width, mixing_ratio, num_inference_steps, num_inversion_steps)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | None = None,
        control_frames: FrameInput | list[FrameInput] | None = None,
        video_prompt: str | None = None,
        negative_prompt: str | None = None,
        inversion_prompt: str | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        num_inversion_steps: int | None = None,
        guidance_scale: float = 7.5,
        video_guidance_scale: float | None = None,
        mixing_ratio: float = 1.0,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        adapter_conditioning_scale: float | list[float] = 1.0,
        frame_batch_size: int = 8,
        decode_chunk_size: int = 8,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_idm_frames: bool = True,
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ):
        r"""
        Generate a video that follows a condition video (depth, edges, pose...) and a prompt.

        Args:
            prompt (`str`): The image model's prompt for every frame.
            control_frames (`list[PIL.Image.Image]`, `np.ndarray` `(F, H, W, C)` or `torch.Tensor` `(F, C, H, W)`
                in [0, 1]): One condition image per frame; with several ControlNets/adapters, a list of such videos.
            video_prompt (`str`, *optional*): The video model's prompt; defaults to `prompt`.
            negative_prompt (`str`, *optional*): Used by both models; also the inversion's conditioning.
            inversion_prompt (`str`, *optional*): Conditions both inversions instead of the negative prompt.
            num_frames (`int`, *optional*): Checked against the number of condition frames when given.
            height (`int`, *optional*), width (`int`, *optional*): Output size, multiples of 8; default the
                condition frames' size rounded down to a multiple of 8.
            num_inference_steps (`int`, defaults to 50): Steps of the image model and of smoothing.
            num_inversion_steps (`int`, *optional*): DDIM inversion steps; defaults to `num_inference_steps`.
            guidance_scale (`float`, defaults to 7.5): CFG of the image model.
            video_guidance_scale (`float`, *optional*): CFG of smoothing; defaults to `guidance_scale`.
            mixing_ratio (`float`, defaults to 1.0): Weight r of the image-model inversion in
                `r * z_T(image) + (1 - r) * z_T(video)`; r = 1 runs no video-UNet inversion, r = 0 no image-UNet one.
            controlnet_conditioning_scale (`float` or `list[float]`, defaults to 1.0): As in diffusers.
            adapter_conditioning_scale (`float` or `list[float]`, defaults to 1.0): As in diffusers.
            frame_batch_size (`int`, defaults to 8): Frames per image-model call (stage 1 and image inversion).
            decode_chunk_size (`int`, defaults to 8): Frames per VAE decode call.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): One per frame, or one from which
                a generator per frame is derived; frames are the same whatever `frame_batch_size`.
            latents (`torch.Tensor` `(1, 4, F, h, w)`, *optional*): Initial noise of stage 1.
            output_type (`str`, defaults to `"np"`): `"np"`, `"pt"`, `"pil"` or `"latent"`.
            return_idm_frames (`bool`, defaults to `True`): Also decode and return the image model's frames.
            return_dict (`bool`, defaults to `True`): Return a [`BIVDiffPipelineOutput`] rather than a tuple.
            cross_attention_kwargs (`dict`, *optional*): Passed to the image model's attention processors.
            callback_on_step_end (`Callable`, *optional*): Called after each smoothing step as
                `callback_on_step_end(self, step, timestep, callback_kwargs)`; may return new `latents`.
            callback_on_step_end_tensor_inputs (`list`): Tensors passed in `callback_kwargs`.

        Examples:

        Returns:
            [`BIVDiffPipelineOutput`] or `tuple` `(frames, idm_frames)`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        num_inversion_steps = num_inversion_steps or num_inference_steps
        video_prompt = prompt if video_prompt is None else video_prompt
        video_guidance_scale = guidance_scale if video_guidance_scale is None else video_guidance_scale
        if control_frames is not None and (height is None or width is None):
            first_video = control_frames[0] if self.num_conditions > 1 else control_frames
            h, w = frame_size(first_video)
            height, width = height or h // 8 * 8, width or w // 8 * 8
        self.check_inputs(
            prompt,
            control_frames,
            num_frames,
            latents,
            height,
            width,
            mixing_ratio,
            num_inference_steps,
            num_inversion_steps,
            frame_batch_size,
            decode_chunk_size,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self.begin_call()
        self._guidance_scale = guidance_scale
        device = self._execution_device

        # Prompts are encoded once; every chunk of stage 1 reuses the embeddings.
        negative_embeds, prompt_embeds = self.encode_image_prompt(prompt, negative_prompt, device)

        with self.stage("frame-wise generation"):
            idm_latents = self.generate_frames(
                self.condition_videos(control_frames),
                prompt_embeds,
                negative_embeds,
                height,
                width,
                num_inference_steps,
                guidance_scale,
                controlnet_conditioning_scale if self.controlnet is not None else adapter_conditioning_scale,
                frame_batch_size,
                generator,
                latents,
                cross_attention_kwargs,
            )

        video_latents = self.invert_and_smooth(
            idm_latents,
            video_prompt=video_prompt,
            negative_prompt=negative_prompt,
            inversion_prompt=inversion_prompt,
            mixing_ratio=mixing_ratio,
            num_inference_steps=num_inference_steps,
            num_inversion_steps=num_inversion_steps,
            video_guidance_scale=video_guidance_scale,
            frame_batch_size=frame_batch_size,
            image_negative_embeds=negative_embeds,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

        video = self.postprocess(video_latents, output_type, decode_chunk_size)
        idm_frames = self.postprocess(idm_latents, output_type, decode_chunk_size) if return_idm_frames else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video, idm_frames)
        return BIVDiffPipelineOutput(frames=video, idm_frames=idm_frames)
