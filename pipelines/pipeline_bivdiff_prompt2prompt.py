"""BIVDiff video editing with Prompt2Prompt: every frame edited by attention control on Stable Diffusion, then Mixed
Inversion and a text-to-video model for temporal coherence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

from .mixed_inversion import (
    BIVDiffPipelineOutput,
    FrameInput,
    IMAGE_PROMPT_ARGUMENTS,
    MixedInversionMixin,
    as_list,
    count_frames,
    ddim_sampler,
    fold_frames,
    pipeline_call,
    unfold_frames,
)
from .prompt2prompt_control import (
    AttentionEdit,
    attention_control,
    check_prompt2prompt_inputs,
    make_controller,
    token_ids,
)

# `__call__` arguments handed to `make_controller` as they are
EDIT_OPTIONS = ("cross_replace_steps", "self_replace_steps", "local_blend_words", "local_blend_threshold", "reweight")

EXAMPLE_DOC_STRING = """
        >>> import torch
        >>> from diffusers.utils import export_to_video, load_video
        >>> from bivdiff import BIVDiffPrompt2PromptPipeline, load_video_model

        >>> video_model = load_video_model("cerspense/zeroscope_v2_576w", torch_dtype=torch.float16)
        >>> pipe = BIVDiffPrompt2PromptPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5", **video_model, torch_dtype=torch.float16
        ... ).to("cuda")

        >>> source = load_video("car-turn.mp4")[::4][:8]  # frame stride 4, 8 frames, as the original configs
        >>> out = pipe(
        ...     video=source,
        ...     source_prompt="a jeep car is moving on the road",
        ...     prompt="a jeep car is moving on the road in the snow",  # longer prompt: a "refine" edit
        ...     height=512,
        ...     width=512,
        ... )
        >>> export_to_video(out.frames[0], "car_snow.mp4", fps=8)  # after temporal smoothing
        >>> export_to_video(out.idm_frames[0], "car_snow_frames.mp4", fps=8)  # Prompt2Prompt, frame by frame
        >>> export_to_video(out.source_frames[0], "car_reconstructed.mp4", fps=8)  # inversion + reconstruction

        >>> # A word swap ("replace": same token count) kept to the car's region with a local blend.
        >>> out = pipe(
        ...     video=source,
        ...     source_prompt="a jeep car is moving on the road",
        ...     prompt="a sports car is moving on the road",
        ...     local_blend_words=("jeep", "sports"),
        ...     height=512,
        ...     width=512,
        ... )
"""


@dataclass
class BIVDiffPrompt2PromptPipelineOutput(BIVDiffPipelineOutput):
    r"""
    Output of [`BIVDiffPrompt2PromptPipeline`].

    Args:
        frames: The final, temporally smoothed edited video (layouts as [`BIVDiffPipelineOutput`]).
        idm_frames: The Prompt2Prompt frames, edited one by one (`None` when not asked for).
        source_frames: The source branch: the source video inverted and denoised with `source_prompt`, i.e. what
            the edit is measured against (`None` when not asked for).
    """

    source_frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]] | None = None


class BIVDiffPrompt2PromptPipeline(DiffusionPipeline, MixedInversionMixin):
    r"""
    BIVDiff video editing with Prompt2Prompt.

    0. The source video is VAE-encoded (posterior mean unless a generator is given) and DDIM-inverted by the image
       UNet alone, frame by frame, over the `num_inference_steps` timesteps of stage 1, conditioned on the negative
       prompt (`""` by default, as the original) or on `inversion_prompt`.
    1. Every frame is denoised from that noise twice, once with `source_prompt` and once with `prompt`, by diffusers'
       stock `StableDiffusionPipeline` built from this pipeline's components, while the project's Prompt2Prompt
       attention processors let the edited branch reuse the source branch's attention (cross-attention replaced or
       refined, self-attention replaced, optionally a local blend). The controller only touches the conditional half
       of the guidance batch and keeps one state per frame, so frames never mix; `frame_batch_size` frames (twice as
       many source/edit pairs) go through each call.
    2. + 3. The edited latents are inverted by the image and video UNets, mixed with `mixing_ratio` (the original's
       0.25 for Prompt2Prompt by default) and denoised by the video UNet with `video_prompt`.

    Stage 1 always samples with DDIM (eta 0) built from `scheduler.config`, whatever `scheduler` is: the noise comes
    from DDIM inversion and only DDIM walks back along the same path, so the source branch reconstructs the video
    (the original release sampled with SD-1.5's default PNDM here).

    Args:
        vae ([`AutoencoderKL`]): SD-1.5 VAE; every BIVDiff video model shares its latent space.
        text_encoder ([`CLIPTextModel`]), tokenizer ([`CLIPTokenizer`]), unet ([`UNet2DConditionModel`]): the SD-1.5
            image model that inverts the source and edits the frames.
        video_unet ([`UNet3DConditionModel`] or `VidRDUNet3DConditionModel`): the text-to-video UNet.
        video_text_encoder ([`CLIPTextModel`]), video_tokenizer ([`CLIPTokenizer`]): the video model's text side.
        scheduler ([`SchedulerMixin`]): its config gives the betas of every DDIM schedule (stages 1 and 3).
        inverse_scheduler ([`BIVDiffDDIMInverseScheduler`] or [`DDIMInverseScheduler`]): the inversion step.
        inversion_unet ([`UNet2DConditionModel`], *optional*): inverts frame by frame instead of `unet`, both the
            source and the edited frames. Best left unset: the source branch reconstructs the video only when the
            UNet that inverts it is the one that denoises it.
    """

    # Prompts are encoded first; the VAE then encodes the source frames, which `unet` inverts and edits.
    model_cpu_offload_seq = "text_encoder->video_text_encoder->vae->unet->inversion_unet->video_unet"
    _optional_components = ["inversion_unet", "inverse_scheduler"]
    output_class = BIVDiffPrompt2PromptPipelineOutput
    always_inverts_with_image_unet = True
    derives_frame_generators = False

    # ------------------------------------------------------------------ stage 0: the source video's noise
    def invert_source(
        self, latents: torch.Tensor, cond: torch.Tensor, num_steps: int, frame_batch_size: int, pooled: bool = True
    ) -> torch.Tensor:
        """DDIM-invert the source latents (1, C, F, h, w) with the image UNet only (r = 1), frame-pooled norms as
        the original's inflated UNet unless `pooled` is off."""
        # The mixin's image branch does exactly this; only the progress bar's label differs (a user label wins).
        config = getattr(self, "_progress_bar_config", {})
        self._progress_bar_config = {"desc": "Source inversion (image UNet)", **config}
        try:
            return self.invert_image_branch(latents, cond, num_steps, frame_batch_size, pooled)
        finally:
            self._progress_bar_config = config

    # ------------------------------------------------------------------ stage 1
    def resolve_edit_type(self, source_prompt: str, prompt: str, edit_type: str | None) -> str:
        """`edit_type` as given, or when `None`: "replace" for prompts with the same token count, else "refine"."""
        if edit_type is not None:
            return edit_type
        same_length = len(token_ids(self.tokenizer, source_prompt)) == len(token_ids(self.tokenizer, prompt))
        return "replace" if same_length else "refine"

    def edit_frames(
        self,
        noise: torch.Tensor,
        controller: AttentionEdit,
        pair_embeds: torch.Tensor,
        negative_embeds: torch.Tensor,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        frame_batch_size: int,
        ddim: bool = True,
        upcast: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt2Prompt on every frame of one video from its inverted noise (1, C, F, h, w), sampled with DDIM (or
        with `scheduler` as given), the UNet in float32 when `upcast`.

        `pair_embeds` holds the (source, edited) prompt embeddings (2, L, D). Each chunk runs the stock pipeline on
        the batch [src_0, edit_0, src_1, edit_1, ...], both branches of a frame starting from the frame's noise.
        Returns the source-branch and edited latents, each (1, C, F, h, w).
        """
        num_frames = noise.shape[2]
        # DDIM retraces the DDIM inversion of the source; its settings follow the smoothing scheduler's rule. The
        # scheduler is copied either way: a multistep sampler keeps state between calls.
        scheduler = ddim_sampler(self.scheduler) if ddim else type(self.scheduler).from_config(self.scheduler.config)
        # No text encoder: the embeddings are given, and the stock pipeline would cast them to its dtype.
        pipe = self.stock_pipeline(
            StableDiffusionPipeline, "Frame-wise editing (Prompt2Prompt)", scheduler=scheduler, text_encoder=None
        )
        dtype = self.unet.dtype
        if upcast:
            self.unet.to(torch.float32)
            noise, pair_embeds, negative_embeds = (x.float() for x in (noise, pair_embeds, negative_embeds))
        # Given a LoRA `scale`, the stock pipeline would also scale its text encoder's LoRA layers, and it has no
        # text encoder here: the scale is set on the UNet's LoRA layers around the edit instead.
        attention_kwargs = dict(self.cross_attention_kwargs or {})
        lora_scale = attention_kwargs.pop("scale", 1.0)
        rescaled = USE_PEFT_BACKEND and lora_scale != 1.0  # without PEFT no LoRA layer can be loaded
        if rescaled:
            scale_lora_layers(self.unet, lora_scale)
        settings = dict(
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            cross_attention_kwargs=attention_kwargs or None,
        )
        try:
            sources, edits = self._edit_chunks(
                pipe, fold_frames(noise), controller, pair_embeds, negative_embeds, frame_batch_size, **settings
            )
        finally:
            if upcast:  # a cast, even a no-op one, makes diffusers warn
                self.unet.to(dtype)
            if rescaled:
                unscale_lora_layers(self.unet, lora_scale)
        return unfold_frames(sources.to(dtype), num_frames), unfold_frames(edits.to(dtype), num_frames)

    def _edit_chunks(
        self, pipe, noise, controller, pair_embeds, negative_embeds, frame_batch_size, **settings
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stock pipeline on chunks of `frame_batch_size` folded frames (F, C, h, w); returns the source and
        edited latents, each (F, C, h, w)."""
        num_frames = noise.shape[0]
        sources, edits = [], []
        with attention_control(self.unet, controller):
            for start in range(0, num_frames, frame_batch_size):
                chunk = noise[start : start + frame_batch_size]
                n = chunk.shape[0]
                # The controller's step counter and local-blend maps belong to one chunk of frames.
                controller.reset()
                out = pipe(
                    prompt_embeds=pair_embeds.repeat(n, 1, 1),
                    negative_prompt_embeds=negative_embeds.expand(2 * n, -1, -1),
                    latents=chunk.repeat_interleave(2, dim=0),
                    output_type="latent",
                    callback_on_step_end=controller.callback_on_step_end,
                    **settings,
                ).images
                sources.append(out[0::2])
                edits.append(out[1::2])
        return torch.cat(sources), torch.cat(edits)

    def generate_frames(self, call, embeds) -> torch.Tensor:
        """Stage 0 and 1: each video's source noise (its VAE sample inverted by the image UNet, or `latents`), then
        Prompt2Prompt frame by frame with that video's (source, edit) prompt pair. The source-branch latents are
        kept in `call.reconstructed`."""
        device = self._execution_device
        k = call.num_videos_per_prompt
        source_embeds = self.encode_prompt(
            call.source_prompt,
            device,
            k,
            lora_scale=(call.cross_attention_kwargs or {}).get("scale"),
            clip_skip=call.clip_skip,
        )[0]
        noise = call.latents
        if noise is None:
            pixels = self.source_pixels(call.video, call.height, call.width, call.resize_mode)
            # Without a generator every video's source latents are the posterior mean of the same frames: under one
            # inversion prompt a single inversion serves every edit.
            cond = embeds.image_cond
            shared = call.generator is None and all(torch.equal(row, cond[0]) for row in cond)
            count = 1 if shared else call.batch_size
            source = self.encode_frames(pixels, call.decode_chunk_size, call.generator, count)
            noise = self.invert_source(
                source, cond[:count], call.num_inference_steps, call.frame_batch_size, call.pool_norms_over_frames
            ).expand(call.batch_size, -1, -1, -1, -1)
        cfg = self.stage1_guided(self.guidance_scale)
        pairs = [p for p in zip(as_list(call.source_prompt, call.num_prompts), as_list(call.prompt, call.num_prompts))]
        reconstructed, edited = [], []
        for b in range(call.batch_size):
            source_prompt, prompt = pairs[b // k]
            controller = make_controller(
                self.tokenizer,
                source_prompt,
                prompt,
                call.edit_types[b // k],
                call.num_inference_steps,
                do_classifier_free_guidance=cfg,
                **{name: getattr(call, name) for name in EDIT_OPTIONS},
            )
            source_latents, edit_latents = self.edit_frames(
                noise[b : b + 1].to(device, self.unet.dtype),
                controller,
                torch.cat([source_embeds[b : b + 1], embeds.image[b : b + 1]]),
                embeds.image_negative[b : b + 1],
                call.height,
                call.width,
                call.num_inference_steps,
                call.guidance_scale,
                call.frame_batch_size,
                call.edit_with_ddim,
                call.upcast_editing,
            )
            reconstructed.append(source_latents)
            edited.append(edit_latents)
        call.reconstructed = torch.cat(reconstructed)
        return torch.cat(edited)

    def extra_outputs(self, call) -> dict:
        if not call.return_idm_frames:
            return {"source_frames": None}
        return {"source_frames": self.postprocess(call.reconstructed, call.output_type, call.decode_chunk_size)}

    # ------------------------------------------------------------------ checks
    def check_inputs(self, call):
        if call.video is None or count_frames(call.video) == 0:
            raise ValueError("`video` is required: the source frames to edit (PIL images, an array or a tensor).")
        sources, prompts = as_list(call.source_prompt, call.num_prompts), as_list(call.prompt, call.num_prompts)
        for name, values in (("source_prompt", sources), ("prompt", prompts)):
            if not all(isinstance(v, str) and v.strip() for v in values):
                raise ValueError(
                    f"`{name}` must be a non-empty string (or list of them): `source_prompt` describes the source "
                    f"video, `prompt` the edited one; got {getattr(call, name)!r}. Prompt2Prompt aligns their tokens, "
                    "so embeddings alone cannot replace them."
                )
        call.edit_types = [self.resolve_edit_type(s, p, call.edit_type) for s, p in zip(sources, prompts)]
        for source_prompt, prompt, edit_type in zip(sources, prompts, call.edit_types):
            check_prompt2prompt_inputs(
                self.tokenizer,
                source_prompt,
                prompt,
                edit_type,
                local_blend_words=call.local_blend_words,
                cross_replace_steps=call.cross_replace_steps,
                self_replace_steps=call.self_replace_steps,
                local_blend_threshold=call.local_blend_threshold,
                reweight=call.reweight,
            )
        self.check_image_model((self.vae.config.latent_channels,), "a plain text-to-image UNet (SD-1.5)")
        # The source is inverted by the image UNet whatever `mixing_ratio` is.
        self.check_image_inversion_components()

    # Attention editing replaces the attention processors an IP-Adapter or cross-frame attention would need.
    @pipeline_call(EXAMPLE_DOC_STRING, without=(*IMAGE_PROMPT_ARGUMENTS, "cross_frame_attention"))
    def __call__(
        self,
        video: FrameInput | None = None,
        source_prompt: str | list[str] | None = None,
        prompt: str | list[str] | None = None,
        edit_type: str | None = None,
        cross_replace_steps: float | tuple[float, float] | dict[str, float | tuple[float, float]] = 0.4,
        self_replace_steps: float | tuple[float, float] = 0.4,
        reweight: dict[str, float] | None = None,
        local_blend_words: str | Sequence[str | Sequence[str]] | None = None,
        local_blend_threshold: float = 0.3,
        edit_with_ddim: bool = True,
        upcast_editing: bool = False,
        mixing_ratio: float = 0.25,
        **shared,
    ):
        r"""
        Edit a video by changing its prompt.

        Args:
            video (`list[PIL.Image.Image]`, `np.ndarray` `(F, H, W, 3)` or `torch.Tensor` `(F, 3, H, W)` in [0, 1]):
                The source video.
            source_prompt (`str` or `list[str]`): Describes the source video.
            prompt (`str` or `list[str]`): The edited description, e.g. one word swapped or words added; N
                (source, edit) pairs give N edited videos in one call.
            inversion_prompt (`str`, *optional*): Conditions the source inversion and both Mixed Inversion branches
                instead of the negative prompt (e.g. `source_prompt`; the original inverted on `""`).
            edit_type (`str`, *optional*): `"replace"` (prompts with the same number of tokens: the edited prompt
                uses the source's cross-attention maps through the word-swap mapping), `"refine"` (any prompts:
                tokens aligned to identical source tokens take the source's maps, new tokens keep their own) or
                `"reweight"` (the source's maps position by position, scaled by `reweight`). Defaults to
                `"replace"` when the two prompts have the same token count, else `"refine"`.
            cross_replace_steps (`float`, `(float, float)` or `dict`, defaults to 0.4): Fraction of the steps from the
                start, or a (start, end) pair of fractions, during which cross-attention is edited; a dict gives
                words of the edited prompt their own fraction or pair (key `"default_"` for the other tokens,
                (0, 1) when absent). As the original, a window covers steps int(start * (N + 1)) <= i <
                int(end * (N + 1)).
            self_replace_steps (`float` or `(float, float)`, defaults to 0.4): Same (steps int(start * N) <= i <
                int(end * N)), for replacing the edited branch's self-attention by the source's in the coarse
                layers (16x16 at 512 px).
            reweight (`dict[str, float]`, *optional*): Words of the edited prompt and a strength for each: their
                cross-attention is scaled by it while cross-attention is edited (the original's equalizer). Needed
                by `edit_type="reweight"`; with another edit type it scales that edit's maps.
            edit_with_ddim (`bool`, defaults to `True`): The frame-wise stage samples with DDIM (eta 0, the
                scheduler's betas), so the source branch retraces the DDIM inversion of the source. `False` samples
                with `scheduler` as given (the original used SD-1.5's PNDM).
            upcast_editing (`bool`, defaults to `False`): Run the frame-wise stage with the UNet in float32
                whatever the pipeline's dtype, as the original (which ran Prompt2Prompt in fp32, the rest in fp16).
            local_blend_words (`str`, `(source, edit)` pair or `list[str]`, *optional*): Words whose attention marks
                the region allowed to change; outside it every frame keeps its source-branch latents. A pair gives
                the source prompt's words then the edited prompt's, as the original.
            local_blend_threshold (`float`, defaults to 0.3): Threshold on the normalised blend-word attention.
            mixing_ratio (`float`, defaults to 0.25): Weight r of the image-model inversion in
                `r * z_T(image) + (1 - r) * z_T(video)` for the edited frames (the original's value for
                Prompt2Prompt); r = 1 runs no video-UNet inversion, r = 0 no image-UNet one.
            num_inference_steps (`int`, defaults to 50): DDIM steps of the source inversion, of the frame-wise
                editing (the two must match for the source branch to retrace the inversion) and of smoothing.
            generator: Samples the VAE posterior of the source frames; without it the posterior mean is used.
                Nothing else is random (every DDIM runs with eta 0).
            latents (`torch.Tensor` `(B, 4, F, h, w)`, *optional*): Stage 1's initial noise, instead of the
                inverted source video.
            return_idm_frames (`bool`, defaults to `True`): Also decode and return the Prompt2Prompt frames and the
                source reconstruction.
            callback_on_step_end: The frame-wise stage's step callback belongs to the attention controller, so
                this one is called after each smoothing step only.
        Examples:

        Returns:
            [`BIVDiffPrompt2PromptPipelineOutput`] or `tuple` `(frames, idm_frames, source_frames)`.
        """
        return self.run(locals())
