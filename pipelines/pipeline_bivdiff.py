"""BIVDiff for frames made by any image model: Mixed Inversion and temporal smoothing of a given frame sequence."""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import replace_example_docstring
from diffusers.video_processor import VideoProcessor
from transformers import CLIPTextModel, CLIPTokenizer

from .mixed_inversion import BIVDiffPipelineOutput, FrameInput, MixedInversionMixin, count_frames, frame_size

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DiffusionPipeline, UNet3DConditionModel
        >>> from diffusers.utils import export_to_video, load_video
        >>> from transformers import CLIPTextModel, CLIPTokenizer
        >>> from bivdiff import BIVDiffDDIMInverseScheduler, BIVDiffPipeline

        >>> sd = DiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", torch_dtype=torch.float16)
        >>> zeroscope = "cerspense/zeroscope_v2_576w"
        >>> pipe = BIVDiffPipeline(
        ...     vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
        ...     video_unet=UNet3DConditionModel.from_pretrained(zeroscope, subfolder="unet", torch_dtype=torch.float16),
        ...     video_text_encoder=CLIPTextModel.from_pretrained(zeroscope, subfolder="text_encoder", torch_dtype=torch.float16),
        ...     video_tokenizer=CLIPTokenizer.from_pretrained(zeroscope, subfolder="tokenizer"),
        ...     scheduler=sd.scheduler,
        ...     inverse_scheduler=BIVDiffDDIMInverseScheduler.from_config(sd.scheduler.config),
        ... ).to("cuda")

        >>> frames = load_video("frames_from_my_image_model.gif")  # 8 frames edited one by one
        >>> video = pipe(frames=frames, prompt="a bear walking through a snow mountain", mixing_ratio=0.5).frames[0]
        >>> export_to_video(video, "bivdiff.mp4", fps=8)
        ```
"""


class BIVDiffPipeline(DiffusionPipeline, MixedInversionMixin):
    r"""
    BIVDiff stages 2 and 3 on frames produced elsewhere ("bring your own image model"): the frames are VAE-encoded,
    inverted by the image UNet (frame by frame) and the video UNet (whole clip), the two noises are mixed with
    `mixing_ratio`, and the video model denoises the mix into a temporally coherent video.

    Args:
        vae ([`AutoencoderKL`]): SD-1.5 VAE; every BIVDiff video model shares its latent space.
        text_encoder ([`CLIPTextModel`], *optional*): SD-1.5 text encoder for the image branch of the inversion.
        tokenizer ([`CLIPTokenizer`], *optional*): its tokenizer.
        unet ([`UNet2DConditionModel`], *optional*): SD-1.5 UNet that inverts frame by frame. The image-branch
            components may be `None` when the pipeline is only called with `mixing_ratio=0`.
        video_unet ([`UNet3DConditionModel`] or `VidRDUNet3DConditionModel`): the text-to-video UNet.
        video_text_encoder ([`CLIPTextModel`]): the video model's text encoder.
        video_tokenizer ([`CLIPTokenizer`]): its tokenizer.
        scheduler ([`SchedulerMixin`]): its config gives the DDIM schedule of smoothing.
        inverse_scheduler ([`BIVDiffDDIMInverseScheduler`] or [`DDIMInverseScheduler`]): the inversion step.
    """

    model_cpu_offload_seq = "text_encoder->video_text_encoder->unet->video_unet->vae"
    _optional_components = ["text_encoder", "tokenizer", "unet"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel | None,
        tokenizer: CLIPTokenizer | None,
        unet: UNet2DConditionModel | None,
        video_unet: ModelMixin,
        video_text_encoder: CLIPTextModel,
        video_tokenizer: CLIPTokenizer,
        scheduler: KarrasDiffusionSchedulers,
        inverse_scheduler: SchedulerMixin,
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
        )
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor)

    def check_inputs(
        self,
        frames,
        latents,
        prompt,
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
        if (frames is None) == (latents is None):
            raise ValueError("Pass exactly one of `frames` (images) or `latents` (their scaled VAE latents).")
        if frames is not None and count_frames(frames) == 0:
            raise ValueError("`frames` is empty.")
        if latents is not None and latents.ndim != 5:
            raise ValueError(f"`latents` must be (B, C, F, h, w), got shape {tuple(latents.shape)}.")
        if not isinstance(prompt, str):
            raise ValueError(f"`prompt` must be a string describing the video, got {type(prompt).__name__}.")
        self.check_call_options(frame_batch_size, decode_chunk_size, output_type, callback_on_step_end_tensor_inputs)
        self.check_mixed_inversion_inputs(height, width, mixing_ratio, num_inference_steps, num_inversion_steps)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        frames: FrameInput | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        inversion_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        num_inversion_steps: int | None = None,
        guidance_scale: float = 7.5,
        mixing_ratio: float = 1.0,
        frame_batch_size: int = 8,
        decode_chunk_size: int = 8,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ):
        r"""
        Make a frame sequence temporally coherent with a video diffusion model.

        Args:
            frames (`list[PIL.Image.Image]`, `np.ndarray` `(F, H, W, 3)` or `torch.Tensor` `(F, 3, H, W)` in [0, 1]):
                The frames made by an image model. Exactly one of `frames` and `latents`.
            prompt (`str`): What the video shows, for the video model.
            negative_prompt (`str`, *optional*): Negative prompt of smoothing; also the inversion's conditioning.
            inversion_prompt (`str`, *optional*): Conditions both inversions instead of the negative prompt.
            height (`int`, *optional*), width (`int`, *optional*): Output size, multiples of 8; default the frames'.
            num_inference_steps (`int`, defaults to 50): DDIM steps of smoothing.
            num_inversion_steps (`int`, *optional*): DDIM inversion steps; defaults to `num_inference_steps`.
            guidance_scale (`float`, defaults to 7.5): Classifier-free guidance of smoothing.
            mixing_ratio (`float`, defaults to 1.0): Weight r of the image-model inversion in
                `r * z_T(image) + (1 - r) * z_T(video)`. The original release used 1.0 for ControlNet and
                InstructPix2Pix frames, 0.25 for Prompt2Prompt and 0.1 for inpainting.
            frame_batch_size (`int`, defaults to 8): Frames per image-UNet call.
            decode_chunk_size (`int`, defaults to 8): Frames per VAE call.
            generator (`torch.Generator`, *optional*): Samples the VAE posterior; without it the posterior mean is
                used.
            latents (`torch.Tensor` `(B, 4, F, h, w)`, *optional*): Scaled VAE latents of the frames, instead of
                `frames`.
            output_type (`str`, defaults to `"np"`): `"np"`, `"pt"`, `"pil"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): Return a [`BIVDiffPipelineOutput`] rather than a tuple.
            callback_on_step_end (`Callable`, *optional*): Called after each smoothing step as
                `callback_on_step_end(self, step, timestep, callback_kwargs)`; may return new `latents`.
            callback_on_step_end_tensor_inputs (`list`): Tensors passed in `callback_kwargs`.

        Examples:

        Returns:
            [`BIVDiffPipelineOutput`] or `tuple`: the smoothed video, and `idm_frames=None` (the input frames are
            the user's own).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        num_inversion_steps = num_inversion_steps or num_inference_steps
        if frames is not None and (height is None or width is None):
            h, w = frame_size(frames)
            height, width = height or h // 8 * 8, width or w // 8 * 8
        elif latents is not None:
            height = latents.shape[-2] * self.vae_scale_factor
            width = latents.shape[-1] * self.vae_scale_factor
        self.check_inputs(
            frames,
            latents,
            prompt,
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

        if latents is None:
            latents = self.encode_frames(frames, height, width, frame_batch_size, generator)
        latents = latents.to(device)

        latents = self.invert_and_smooth(
            latents,
            video_prompt=prompt,
            negative_prompt=negative_prompt,
            inversion_prompt=inversion_prompt,
            mixing_ratio=mixing_ratio,
            num_inference_steps=num_inference_steps,
            num_inversion_steps=num_inversion_steps,
            video_guidance_scale=guidance_scale,
            frame_batch_size=frame_batch_size,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        video = self.postprocess(latents, output_type, decode_chunk_size)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video, None)
        return BIVDiffPipelineOutput(frames=video, idm_frames=None)
