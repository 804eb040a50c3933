"""BIVDiff video editing: InstructPix2Pix edits every frame, then Mixed Inversion and a text-to-video model make the
edited frames temporally coherent."""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
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
        >>> import torch
        >>> from diffusers import UNet2DConditionModel, UNet3DConditionModel
        >>> from diffusers.utils import export_to_video, load_video
        >>> from transformers import CLIPTextModel, CLIPTokenizer
        >>> from bivdiff import BIVDiffDDIMInverseScheduler, BIVDiffInstructPix2PixPipeline

        >>> zeroscope = "cerspense/zeroscope_v2_576w"
        >>> pipe = BIVDiffInstructPix2PixPipeline.from_pretrained(
        ...     "timbrooks/instruct-pix2pix",
        ...     inversion_unet=UNet2DConditionModel.from_pretrained(
        ...         "stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="unet", torch_dtype=torch.float16
        ...     ),
        ...     video_unet=UNet3DConditionModel.from_pretrained(zeroscope, subfolder="unet", torch_dtype=torch.float16),
        ...     video_text_encoder=CLIPTextModel.from_pretrained(zeroscope, subfolder="text_encoder", torch_dtype=torch.float16),
        ...     video_tokenizer=CLIPTokenizer.from_pretrained(zeroscope, subfolder="tokenizer"),
        ...     inverse_scheduler=BIVDiffDDIMInverseScheduler.from_pretrained(
        ...         "stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="scheduler"
        ...     ),
        ...     torch_dtype=torch.float16,
        ... )
        >>> pipe.to("cuda")

        >>> source = [f.resize((512, 512)) for f in load_video("train.mp4")[::4][:8]]
        >>> video = pipe(
        ...     video=source,
        ...     prompt="Make it minecraft style",
        ...     video_prompt="A train is running, minecraft style",
        ...     generator=torch.Generator("cuda").manual_seed(42),
        ... ).frames[0]
        >>> export_to_video(video, "train_minecraft.mp4", fps=8)
        ```
"""


class BIVDiffInstructPix2PixPipeline(DiffusionPipeline, MixedInversionMixin):
    r"""
    BIVDiff video editing with InstructPix2Pix. Stage 1 runs diffusers' stock `StableDiffusionInstructPix2PixPipeline`
    on every source frame, `frame_batch_size` at a time, one generator per frame; stage 2 inverts the edited latents
    with an SD-1.5 image UNet and the video UNet and mixes them with `mixing_ratio`; stage 3 denoises the mix with the
    video UNet, prompted by `video_prompt`.

    Args:
        vae, text_encoder, tokenizer, scheduler: the InstructPix2Pix model's (SD-1.5 family; `scheduler` drives
            stage 1, its config also gives the DDIM schedule of smoothing).
        unet ([`UNet2DConditionModel`]): the 8-channel InstructPix2Pix UNet (noisy latents + source-frame latents).
        video_unet ([`UNet3DConditionModel`] or `VidRDUNet3DConditionModel`): the text-to-video UNet.
        video_text_encoder ([`CLIPTextModel`]), video_tokenizer ([`CLIPTokenizer`]): the video model's text side.
        inverse_scheduler ([`BIVDiffDDIMInverseScheduler`] or [`DDIMInverseScheduler`]): the inversion step.
        inversion_unet ([`UNet2DConditionModel`], *optional*): a plain 4-channel SD-1.5 UNet for the image branch
            of the inversion; needed whenever `mixing_ratio` > 0, since the 8-channel `unet` cannot invert latents
            alone.
    """

    model_cpu_offload_seq = "text_encoder->video_text_encoder->unet->inversion_unet->video_unet->vae"
    _optional_components = ["inversion_unet"]
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

    # ------------------------------------------------------------------ stage 1
    def image_pipeline(self) -> StableDiffusionInstructPix2PixPipeline:
        """The stock diffusers InstructPix2Pix pipeline, built from this pipeline's own components (no copies)."""
        pipe = StableDiffusionInstructPix2PixPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        config = dict(getattr(self, "_progress_bar_config", {}))
        config.setdefault("desc", "Frame-wise editing (InstructPix2Pix)")
        pipe.set_progress_bar_config(**config)
        return pipe

    def generate_frames(
        self,
        source: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        image_guidance_scale: float,
        frame_batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        cross_attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """Stage 1: InstructPix2Pix on every source frame (F, 3, H, W) in [0, 1], in chunks; returns scaled latents
        (1, 4, F, h, w)."""
        num_frames = source.shape[0]
        generators = frame_generators(generator, num_frames)
        noise = fold_frames(latents) if latents is not None else None
        pipe = self.image_pipeline()
        chunks = []
        for start in range(0, num_frames, frame_batch_size):
            stop = min(start + frame_batch_size, num_frames)
            n = stop - start
            chunks.append(
                pipe(
                    image=source[start:stop],
                    prompt_embeds=prompt_embeds.expand(n, -1, -1),
                    negative_prompt_embeds=negative_prompt_embeds.expand(n, -1, -1),
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    image_guidance_scale=image_guidance_scale,
                    generator=generators[start:stop] if generators is not None else None,
                    latents=noise[start:stop] if noise is not None else None,
                    cross_attention_kwargs=cross_attention_kwargs,
                    output_type="latent",
                ).images
            )
        return unfold_frames(torch.cat(chunks), num_frames)

    # ------------------------------------------------------------------ checks
    def check_inputs(
        self,
        video,
        prompt,
        video_prompt,
        latents,
        generator,
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
        if video is None or count_frames(video) == 0:
            raise ValueError(
                "`video` is required: the source frames to edit (PIL list, np (F, H, W, 3) or (F, 3, H, W) tensor)."
            )
        num_frames = count_frames(video)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("`prompt` must be a non-empty edit instruction, e.g. 'make it minecraft style'.")
        if not isinstance(video_prompt, str) or not video_prompt.strip():
            raise ValueError(
                "`video_prompt` is required: a description of the edited video for the video model, e.g. "
                "'a train is running, minecraft style'. The edit instruction in `prompt` is not a description, "
                "so it is not used in its place."
            )
        if latents is not None and (latents.ndim != 5 or latents.shape[2] != num_frames):
            raise ValueError(
                f"`latents` must be (1, 4, F, h, w) noise with F = {num_frames} frames, "
                f"got shape {tuple(latents.shape)}."
            )
        if isinstance(generator, list) and len(generator) != num_frames:
            raise ValueError(f"`generator` is a list of {len(generator)}; pass one per frame ({num_frames}).")
        expected = 2 * self.vae.config.latent_channels
        if self.unet.config.in_channels != expected:
            raise ValueError(
                f"`unet` must be an InstructPix2Pix UNet taking {expected} channels (noisy + source latents), got "
                f"{self.unet.config.in_channels}."
            )
        if self.unet.config.cross_attention_dim != self.text_encoder.config.hidden_size:
            raise ValueError(
                f"`unet` expects text embeddings of width {self.unet.config.cross_attention_dim} but `text_encoder` "
                f"produces {self.text_encoder.config.hidden_size}."
            )
        if mixing_ratio > 0 and self.inversion_unet is None:
            raise ValueError(
                f"`mixing_ratio`={mixing_ratio} inverts the edited frames with an image UNet, and the 8-channel "
                "InstructPix2Pix `unet` cannot do it. Pass `inversion_unet` (an SD-1.5 UNet2DConditionModel, e.g. "
                "from 'stable-diffusion-v1-5/stable-diffusion-v1-5', subfolder 'unet'), or set `mixing_ratio=0`."
            )
        self.check_call_options(frame_batch_size, decode_chunk_size, output_type, callback_on_step_end_tensor_inputs)
        self.check_mixed_inversion_inputs(height, width, mixing_ratio, num_inference_steps, num_inversion_steps)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        video: FrameInput | None = None,
        prompt: str | None = None,
        video_prompt: str | None = None,
        negative_prompt: str | None = None,
        inversion_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        num_inversion_steps: int | None = None,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        video_guidance_scale: float | None = None,
        mixing_ratio: float = 1.0,
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
        Edit a video by an instruction.

        Args:
            video (`list[PIL.Image.Image]`, `np.ndarray` `(F, H, W, 3)` or `torch.Tensor` `(F, 3, H, W)` in [0, 1]):
                The source frames.
            prompt (`str`): The edit instruction given to InstructPix2Pix for every frame ("make it snowy").
            video_prompt (`str`): What the edited video shows, for the video model ("a snowy street"). Required:
                an instruction is not a description.
            negative_prompt (`str`, *optional*): Used by both models; also the inversion's conditioning.
            inversion_prompt (`str`, *optional*): Conditions both inversions instead of the negative prompt.
            height (`int`, *optional*), width (`int`, *optional*): Output size, multiples of 8; default the source
                frames' size rounded down to a multiple of 8. Frames are resized (not cropped) to it.
            num_inference_steps (`int`, defaults to 50): Steps of InstructPix2Pix and of smoothing.
            num_inversion_steps (`int`, *optional*): DDIM inversion steps; defaults to `num_inference_steps`.
            guidance_scale (`float`, defaults to 7.5): Text guidance of InstructPix2Pix.
            image_guidance_scale (`float`, defaults to 1.5): Source-image guidance of InstructPix2Pix; guidance is
                off altogether when it is below 1 or `guidance_scale` is at most 1 (as in diffusers).
            video_guidance_scale (`float`, *optional*): CFG of smoothing; defaults to `guidance_scale`.
            mixing_ratio (`float`, defaults to 1.0): Weight r of the image-model inversion in
                `r * z_T(image) + (1 - r) * z_T(video)`; r > 0 needs `inversion_unet`.
            frame_batch_size (`int`, defaults to 8): Frames per image-model call (stage 1 and image inversion).
            decode_chunk_size (`int`, defaults to 8): Frames per VAE decode call.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): One per frame, or one from which
                a generator per frame is derived; frames are the same whatever `frame_batch_size`.
            latents (`torch.Tensor` `(1, 4, F, h, w)`, *optional*): Initial noise of stage 1.
            output_type (`str`, defaults to `"np"`): `"np"`, `"pt"`, `"pil"` or `"latent"`.
            return_idm_frames (`bool`, defaults to `True`): Also decode and return the frame-wise edits.
            return_dict (`bool`, defaults to `True`): Return a [`BIVDiffPipelineOutput`] rather than a tuple.
            cross_attention_kwargs (`dict`, *optional*): Passed to InstructPix2Pix's attention processors.
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
        video_guidance_scale = guidance_scale if video_guidance_scale is None else video_guidance_scale
        if video is not None and count_frames(video) > 0 and (height is None or width is None):
            h, w = frame_size(video)
            height, width = height or h // 8 * 8, width or w // 8 * 8
        self.check_inputs(
            video,
            prompt,
            video_prompt,
            latents,
            generator,
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
                self.source_pixels(video, height, width),
                prompt_embeds,
                negative_embeds,
                num_inference_steps,
                guidance_scale,
                image_guidance_scale,
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

        frames = self.postprocess(video_latents, output_type, decode_chunk_size)
        idm_frames = self.postprocess(idm_latents, output_type, decode_chunk_size) if return_idm_frames else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames, idm_frames)
        return BIVDiffPipelineOutput(frames=frames, idm_frames=idm_frames)
