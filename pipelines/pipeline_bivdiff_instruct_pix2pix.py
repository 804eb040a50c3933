"""BIVDiff video editing: InstructPix2Pix edits every frame, then Mixed Inversion and a text-to-video model make the
edited frames temporally coherent."""

from __future__ import annotations


import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionInstructPix2PixPipeline,
)

from .mixed_inversion import FrameInput, ImagePromptMixin, as_list, count_frames, pipeline_call

EXAMPLE_DOC_STRING = """
        >>> import torch
        >>> from diffusers import UNet2DConditionModel
        >>> from diffusers.utils import export_to_video, load_video
        >>> from bivdiff import BIVDiffInstructPix2PixPipeline, load_video_model

        >>> sd15_unet = UNet2DConditionModel.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="unet", torch_dtype=torch.float16
        ... )
        >>> pipe = BIVDiffInstructPix2PixPipeline.from_pretrained(
        ...     "timbrooks/instruct-pix2pix",
        ...     inversion_unet=sd15_unet,  # the 8-channel editing UNet cannot invert latents alone
        ...     **load_video_model("cerspense/zeroscope_v2_576w", torch_dtype=torch.float16),
        ...     torch_dtype=torch.float16,
        ... ).to("cuda")

        >>> source = load_video("train.mp4")[::4][:8]
        >>> video = pipe(
        ...     video=source,
        ...     prompt="Make it minecraft style",
        ...     video_prompt="A train is running, minecraft style",
        ...     height=512,
        ...     width=512,
        ...     resize_mode="crop",  # keep the aspect ratio
        ...     generator=torch.Generator("cuda").manual_seed(42),
        ... ).frames[0]
        >>> export_to_video(video, "train_minecraft.mp4", fps=8)
"""


class BIVDiffInstructPix2PixPipeline(DiffusionPipeline, ImagePromptMixin):
    r"""
    BIVDiff video editing by instruction. Stage 1 runs diffusers' stock `StableDiffusionInstructPix2PixPipeline` on
    every source frame, `frame_batch_size` frames at a time, one generator per frame; stage 2 inverts the edited
    latents with an SD-1.5 image UNet and the video UNet and mixes them with `mixing_ratio`; stage 3 denoises the mix
    with the video UNet, prompted by `video_prompt`.

    Args:
        vae, text_encoder, tokenizer, scheduler: the InstructPix2Pix model's (SD-1.5 family; `scheduler` drives
            stage 1, its config also gives the DDIM schedule of smoothing).
        unet ([`UNet2DConditionModel`]): the 8-channel InstructPix2Pix UNet (noisy latents + source-frame latents).
        video_unet ([`UNet3DConditionModel`], [`UNetMotionModel`] or `VidRDUNet3DConditionModel`): the
            text-to-video UNet.
        video_text_encoder ([`CLIPTextModel`]), video_tokenizer ([`CLIPTokenizer`]): the video model's text side.
        inverse_scheduler ([`BIVDiffDDIMInverseScheduler`] or [`DDIMInverseScheduler`], *optional*): the inversion
            step; by default the original's, built from `scheduler.config`.
        inversion_unet ([`UNet2DConditionModel`], *optional*): a plain 4-channel SD-1.5 UNet for the image branch
            of the inversion; needed whenever `mixing_ratio` > 0, since the 8-channel `unet` cannot invert latents
            alone.
        image_encoder ([`CLIPVisionModelWithProjection`], *optional*), feature_extractor ([`CLIPImageProcessor`],
            *optional*): the image side of an IP-Adapter (`load_ip_adapter` adds them).
    """

    # Prompts are encoded first; the VAE then encodes the source frames inside stage 1.
    model_cpu_offload_seq = "text_encoder->image_encoder->video_text_encoder->vae->unet->inversion_unet->video_unet"
    _optional_components = ["inversion_unet", "inverse_scheduler", "image_encoder", "feature_extractor"]
    # An edit instruction does not describe the video, so `video_prompt` never defaults to it.
    video_prompt_defaults_to_prompt = False

    def check_inputs(self, call):
        if call.video is None or count_frames(call.video) == 0:
            raise ValueError(
                "`video` is required: the source frames to edit (PIL list, np (F, H, W, 3) or (F, 3, H, W) tensor)."
            )
        if call.prompt_embeds is None and not all(
            isinstance(p, str) and p.strip() for p in as_list(call.prompt, call.num_prompts)
        ):
            raise ValueError("`prompt` must be a non-empty edit instruction, e.g. 'make it minecraft style'.")
        if call.video_prompt_embeds is None and not all(
            isinstance(p, str) and p.strip() for p in as_list(call.video_prompt, call.num_prompts)
        ):
            raise ValueError(
                "`video_prompt` is required: a description of the edited video for the video model, e.g. "
                "'a train is running, minecraft style'. The edit instruction in `prompt` is not a description, "
                "so it is not used in its place."
            )
        self.check_image_model((2 * self.vae.config.latent_channels,), "an InstructPix2Pix UNet")

    video_takes_image_prompt = False  # see `prepare_image_prompt`

    def prepare_image_prompt(self, pipe, call) -> dict:
        # diffusers' stock InstructPix2Pix pipeline hands the adapter's embeddings to its UNet only when it encoded
        # them itself from `ip_adapter_image`, so the image goes to every frame batch (and it takes no embeddings).
        return {} if call.ip_adapter_image is None else {"ip_adapter_image": call.ip_adapter_image}

    def generate_frames(self, call, embeds) -> torch.Tensor:
        """Stage 1: InstructPix2Pix on every source frame, for every video."""
        pipe = self.stock_pipeline(StableDiffusionInstructPix2PixPipeline, "Frame-wise editing (InstructPix2Pix)")
        source = self.source_pixels(call.video, call.height, call.width, call.resize_mode)
        return self.run_frame_batches(
            pipe,
            call,
            embeds,
            lambda frames: {"image": source[frames]},
            image_guidance_scale=call.image_guidance_scale,
        )

    @pipeline_call(EXAMPLE_DOC_STRING, without=("ip_adapter_image_embeds",))  # see `prepare_image_prompt`
    def __call__(
        self,
        video: FrameInput | None = None,
        prompt: str | list[str] | None = None,
        image_guidance_scale: float = 1.5,
        mixing_ratio: float = 1.0,
        **shared,
    ):
        r"""
        Edit a video by an instruction.

        Args:
            video (`list[PIL.Image.Image]`, `np.ndarray` `(F, H, W, 3)` or `torch.Tensor` `(F, 3, H, W)` in [0, 1]):
                The source frames.
            prompt (`str` or `list[str]`): The edit instruction given to InstructPix2Pix for every frame ("make it
                snowy"); N instructions give N edited videos in one call.
            video_prompt (`str` or `list[str]`): What each edited video shows, for the video model ("a snowy
                street"). Required: an instruction is not a description.
            image_guidance_scale (`float`, defaults to 1.5): Source-image guidance of InstructPix2Pix; guidance is
                off altogether when it is below 1 or `guidance_scale` is at most 1 (as in diffusers).
            return_idm_frames (`bool`, defaults to `True`): Also decode and return the frame-wise edits.
            ip_adapter_image (`PipelineImageInput` or `list`, *optional*): The image prompt of the IP-Adapter loaded
                with `load_ip_adapter` (a list: one entry per adapter), for every frame of every video. diffusers'
                stock pipeline reads it only as an image, so it is encoded once per frame batch and no embeddings
                are taken.

        Examples:

        Returns:
            [`BIVDiffPipelineOutput`] or `tuple` `(frames, idm_frames)`.
        """
        return self.run(locals())
