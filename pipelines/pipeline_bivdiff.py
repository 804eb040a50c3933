"""BIVDiff for frames made by any image model: Mixed Inversion and temporal smoothing of a given frame sequence."""

from __future__ import annotations


import torch
from diffusers import DiffusionPipeline

from .mixed_inversion import IMAGE_PROMPT_ARGUMENTS, FrameInput, MixedInversionMixin, count_frames, pipeline_call

EXAMPLE_DOC_STRING = """
        >>> import torch
        >>> from diffusers.utils import export_to_video, load_video
        >>> from bivdiff import BIVDiffPipeline, load_video_model

        >>> pipe = BIVDiffPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5",
        ...     **load_video_model("cerspense/zeroscope_v2_576w", torch_dtype=torch.float16),
        ...     torch_dtype=torch.float16,
        ... ).to("cuda")

        >>> frames = load_video("frames_from_my_image_model.gif")  # 8 frames edited one by one
        >>> video = pipe(video=frames, prompt="a bear walking through a snow mountain", mixing_ratio=0.5).frames[0]
        >>> export_to_video(video, "bivdiff.mp4", fps=8)
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
        video_unet ([`UNet3DConditionModel`], [`UNetMotionModel`] or `VidRDUNet3DConditionModel`): the
            text-to-video UNet.
        video_text_encoder ([`CLIPTextModel`]): the video model's text encoder.
        video_tokenizer ([`CLIPTokenizer`]): its tokenizer.
        scheduler ([`SchedulerMixin`]): its config gives the DDIM schedule of smoothing.
        inverse_scheduler ([`BIVDiffDDIMInverseScheduler`] or [`DDIMInverseScheduler`], *optional*): the inversion
            step; by default the original's, built from `scheduler.config`.
        inversion_unet ([`UNet2DConditionModel`], *optional*): inverts frame by frame instead of `unet`.
    """

    model_cpu_offload_seq = "text_encoder->video_text_encoder->vae->unet->inversion_unet->video_unet"
    _optional_components = ["text_encoder", "tokenizer", "unet", "inverse_scheduler", "inversion_unet"]
    # `prompt` is the video model's: this pipeline has no image-model stage.
    uses_image_prompt = False
    derives_frame_generators = False

    def prepare_call(self, arguments):
        arguments = dict(arguments)
        arguments["video_prompt"] = arguments.pop("prompt")
        arguments["video_prompt_embeds"] = arguments.pop("prompt_embeds")
        arguments["negative_video_prompt_embeds"] = arguments.pop("negative_prompt_embeds")
        call = super().prepare_call(arguments)
        call.prompt = None
        if call.video_latents is not None and call.video is None:
            call.num_frames = call.video_latents.shape[2]
            call.height = call.video_latents.shape[-2] * self.vae_scale_factor
            call.width = call.video_latents.shape[-1] * self.vae_scale_factor
        return call

    def check_inputs(self, call):
        if (call.video is None) == (call.video_latents is None):
            raise ValueError("Pass exactly one of `video` (images) or `video_latents` (their scaled VAE latents).")
        if call.video is not None and count_frames(call.video) == 0:
            raise ValueError("`video` is empty.")
        latents = call.video_latents
        if latents is not None and (latents.ndim != 5 or latents.shape[0] not in (1, call.batch_size)):
            raise ValueError(
                f"`video_latents` must be (B, C, F, h, w) with B = 1 or {call.batch_size}, got {tuple(latents.shape)}."
            )
        if call.video_prompt_embeds is None and not isinstance(call.video_prompt, (str, list, tuple)):
            raise ValueError(
                f"`prompt` must describe the video (a string or a list), got {type(call.video_prompt).__name__}."
            )

    def generate_frames(self, call, embeds) -> torch.Tensor:
        """No image model here: the clean latents are the user's frames, VAE-encoded (a posterior sample, one draw
        per video from `generator`, the mean without one), or the latents given (which `reencode_frames` then
        decodes to 8-bit frames and encodes again)."""
        if call.video_latents is not None:
            return call.video_latents.expand(call.batch_size, -1, -1, -1, -1)
        call.encoded_from_pixels = True
        pixels = self.source_pixels(call.video, call.height, call.width, call.resize_mode)
        return self.encode_frames(pixels, call.decode_chunk_size, call.generator, call.batch_size)

    # No stage 1: no stage-1 noise (`latents`), no frame-wise output, no image prompt, no cross-frame attention, and
    # the one prompt is the video model's.
    @pipeline_call(
        EXAMPLE_DOC_STRING,
        without=("latents", "return_idm_frames", "video_prompt", "video_guidance_scale", "video_prompt_embeds",
                 "negative_video_prompt_embeds", "cross_frame_attention", *IMAGE_PROMPT_ARGUMENTS),
    )
    def __call__(
        self,
        video: FrameInput | None = None,
        prompt: str | list[str] | None = None,
        mixing_ratio: float = 1.0,
        video_latents: torch.Tensor | None = None,
        **shared,
    ):
        r"""
        Make frame sequences temporally coherent with a video diffusion model.

        Here `prompt`, `prompt_embeds` and `negative_prompt_embeds` are the video model's (this pipeline runs no
        image model but the inverting UNet), `guidance_scale` is the CFG of smoothing and `generator` samples the
        VAE posterior of the frames (the posterior mean without one).

        Args:
            video (`list[PIL.Image.Image]`, `np.ndarray` `(F, H, W, 3)` or `torch.Tensor` `(F, 3, H, W)` in [0, 1]):
                The frames made by an image model. Exactly one of `video` and `video_latents`.
            prompt (`str` or `list[str]`): What the video shows, for the video model; N prompts give N videos.
            video_latents (`torch.Tensor` `(B, 4, F, h, w)`, *optional*): Scaled VAE latents of the frames, instead
                of `video` (B = 1 is shared by every video).

        Examples:

        Returns:
            [`BIVDiffPipelineOutput`] or `tuple`: the smoothed video, and `idm_frames=None` (the input frames are
            the user's own).
        """
        return self.run(locals())
