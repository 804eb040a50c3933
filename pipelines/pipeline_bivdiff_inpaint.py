"""BIVDiff video inpainting and outpainting: Stable Diffusion Inpainting fills every frame, then Mixed Inversion and a
text-to-video model make the filled frames temporally coherent."""

from __future__ import annotations


import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, StableDiffusionInpaintPipeline
from diffusers.image_processor import VaeImageProcessor

from .mixed_inversion import FrameInput, ImagePromptMixin, count_frames, frame_size, pipeline_call

EXAMPLE_DOC_STRING = """
        >>> import torch
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers.utils import export_to_video, load_video
        >>> from bivdiff import BIVDiffInpaintPipeline, load_video_model

        >>> sd15 = DiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", torch_dtype=torch.float16)
        >>> pipe = BIVDiffInpaintPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-inpainting",
        ...     inversion_unet=sd15.unet,  # the 9-channel inpainting UNet cannot invert latents alone
        ...     **load_video_model("cerspense/zeroscope_v2_576w", torch_dtype=torch.float16),
        ...     safety_checker=None,
        ...     torch_dtype=torch.float16,
        ... ).to("cuda")

        >>> source = [f.resize((512, 512)) for f in load_video("hike.mp4")[::4][:8]]
        >>> masks = [m.resize((512, 512)) for m in load_video("hike-mask.mp4")[::4][:8]]  # white = regenerate
        >>> erased = pipe(video=source, mask=masks, generator=torch.Generator("cuda").manual_seed(42)).frames[0]
        >>> export_to_video(erased, "hike_inpainted.mp4", fps=8)

        >>> # Outpainting: regenerate the top and bottom quarters, keep the source pixels elsewhere.
        >>> wider = pipe(video=source, outpaint="horizontal", paste_back=True).frames[0]
"""

OUTPAINT_SIDES = ("top", "bottom", "left", "right")


def outpaint_mask(height: int, width: int, outpaint: str | dict | tuple | list) -> np.ndarray:
    """The outpainting mask of a `height` x `width` frame: a float32 (H, W) array, 1.0 = regenerate, 0.0 = keep.

    `outpaint` is `"horizontal"` (rows `[0, H//4)` and `[H//4*3, H)` regenerated, as in the original release),
    `"vertical"` (columns `[0, W//4)` and `[W//4*3, W)`), or pixel margins `(top, bottom, left, right)` or a dict
    with any of those keys (missing ones are 0). The frame keeps its size: to grow a video, pad it first and
    outpaint the padding.
    """
    mask = np.zeros((height, width), dtype=np.float32)
    if isinstance(outpaint, str):
        if outpaint == "horizontal":
            mask[: height // 4] = 1.0
            mask[height // 4 * 3 :] = 1.0
        elif outpaint == "vertical":
            mask[:, : width // 4] = 1.0
            mask[:, width // 4 * 3 :] = 1.0
        else:
            raise ValueError(
                f"Unknown `outpaint` {outpaint!r}: use 'horizontal', 'vertical', or pixel margins "
                "(top, bottom, left, right) / a dict with those keys."
            )
        return mask
    if isinstance(outpaint, dict):
        unknown = set(outpaint) - set(OUTPAINT_SIDES)
        if unknown:
            raise ValueError(f"Unknown `outpaint` margin(s) {sorted(unknown)}; use {list(OUTPAINT_SIDES)}.")
        margins = [outpaint.get(side, 0) for side in OUTPAINT_SIDES]
    elif isinstance(outpaint, (tuple, list)) and len(outpaint) == 4:
        margins = list(outpaint)
    else:
        raise ValueError(
            "`outpaint` must be 'horizontal', 'vertical', (top, bottom, left, right) pixels or a dict, "
            f"got {outpaint!r}."
        )
    if any(not isinstance(m, (int, np.integer)) or isinstance(m, bool) or m < 0 for m in margins):
        raise ValueError(f"`outpaint` margins must be non-negative integers (pixels), got {margins}.")
    top, bottom, left, right = (int(m) for m in margins)
    if top + bottom >= height or left + right >= width:
        raise ValueError(
            f"`outpaint` margins {margins} leave nothing of the {height}x{width} frame to keep; "
            "top + bottom must be below the height and left + right below the width."
        )
    if top + bottom + left + right == 0:
        raise ValueError("`outpaint` margins are all zero: nothing to regenerate.")
    mask[:top] = 1.0
    mask[height - bottom :] = 1.0
    mask[:, :left] = 1.0
    mask[:, width - right :] = 1.0
    return mask


def feather_mask(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """Blend weights (F, 1, H, W) from a binary mask: 1 inside the mask, falling linearly to exactly 0 at more than
    `feather` pixels (chessboard distance) outside it.

    The ramp lies only outside the mask, so no source pixel of a regenerated region leaks back in.
    """
    weight = mask.clone()
    for k in range(1, feather + 1):
        weight += torch.nn.functional.max_pool2d(mask, kernel_size=2 * k + 1, stride=1, padding=k)
    return weight / (feather + 1)


def _gray(values: np.ndarray) -> np.ndarray:
    """(..., H, W, C) -> (..., H, W) with PIL's "L" weights, so array masks read like image masks."""
    if values.shape[-1] == 1:
        return values[..., 0]
    return values[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=values.dtype)


def _to_unit(values: np.ndarray) -> np.ndarray:
    if values.dtype == np.uint8:
        return values.astype(np.float32) / 255.0
    return values.astype(np.float32)


def _array_mask(values) -> torch.Tensor:
    """One mask frame (H, W), (H, W, C) or (C, H, W), array or tensor, as a float32 (1, H, W) tensor in [0, 1]."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    values = _to_unit(np.asarray(values))
    if values.ndim == 3 and values.shape[0] in (1, 3) and values.shape[-1] not in (1, 3):
        values = values.transpose(1, 2, 0)
    if values.ndim == 3:
        values = _gray(values)
    if values.ndim != 2:
        raise ValueError(f"A mask frame must be (H, W) or (H, W, C), got shape {values.shape}.")
    return torch.from_numpy(np.ascontiguousarray(values))[None]


def _item_size(item) -> tuple[int, int]:
    if isinstance(item, PIL.Image.Image):
        return item.height, item.width
    return tuple(item.shape[-2:])


def mask_frames(mask, num_frames: int) -> list:
    """The user's mask as one item per frame: PIL images stay PIL (the stock pipeline reads them itself); arrays and
    tensors become float32 (1, H, W) tensors in [0, 1].

    A single mask (one PIL image, an (H, W) array or tensor) is used for every frame.
    """
    if isinstance(mask, PIL.Image.Image):
        return [mask] * num_frames
    if isinstance(mask, (list, tuple)):
        if all(isinstance(m, PIL.Image.Image) for m in mask):
            return list(mask)
        # One kind per video, so every chunk is read the same way.
        return [_array_mask(np.asarray(m.convert("L")) if isinstance(m, PIL.Image.Image) else m) for m in mask]
    if isinstance(mask, torch.Tensor):
        values = mask.detach().cpu()
        if values.ndim == 4:  # (F, C, H, W) -> (F, H, W, C)
            values = values.permute(0, 2, 3, 1)
        values = values.numpy()
    else:
        values = np.asarray(mask)
    if values.ndim == 2:
        return [_array_mask(values)] * num_frames
    if values.ndim in (3, 4):
        return [_array_mask(v) for v in values]
    raise ValueError(f"`mask` must be (H, W), (F, H, W) or (F, H, W, C), got shape {values.shape}.")


class BIVDiffInpaintPipeline(DiffusionPipeline, ImagePromptMixin):
    r"""
    BIVDiff video inpainting and outpainting. Stage 1 runs diffusers' stock `StableDiffusionInpaintPipeline` on every
    frame with its mask (white = regenerate), `frame_batch_size` frames at a time, one generator per frame; stage 2
    inverts the filled latents with an SD-1.5 image UNet and the video UNet and mixes them with `mixing_ratio`;
    stage 3 denoises the mix with the video UNet. The video model redraws the whole frame, the known region too;
    `paste_back=True` puts the source pixels back there.

    Args:
        vae, text_encoder, tokenizer, scheduler: the inpainting model's (SD-1.5 family; `scheduler` drives stage 1,
            its config also gives the DDIM schedule of smoothing).
        unet ([`UNet2DConditionModel`]): the 9-channel inpainting UNet (a plain 4-channel SD UNet also works, as in
            diffusers, by blending latents).
        video_unet ([`UNet3DConditionModel`] or `VidRDUNet3DConditionModel`): the text-to-video UNet.
        video_text_encoder ([`CLIPTextModel`]), video_tokenizer ([`CLIPTokenizer`]): the video model's text side.
        inverse_scheduler ([`BIVDiffDDIMInverseScheduler`] or [`DDIMInverseScheduler`]): the inversion step.
        inversion_unet ([`UNet2DConditionModel`], *optional*): a plain 4-channel SD-1.5 UNet for the image branch
            of the inversion; needed whenever `mixing_ratio` > 0 and `unet` is the 9-channel inpainting UNet.
        image_encoder ([`CLIPVisionModelWithProjection`], *optional*), feature_extractor ([`CLIPImageProcessor`],
            *optional*): the image side of an IP-Adapter (`load_ip_adapter` adds them).
    """

    # Prompts are encoded first; the VAE then encodes the masked frames inside stage 1.
    model_cpu_offload_seq = "text_encoder->image_encoder->video_text_encoder->vae->unet->inversion_unet->video_unet"
    _optional_components = ["inversion_unet", "inverse_scheduler", "image_encoder", "feature_extractor"]

    @property
    def mask_processor(self) -> VaeImageProcessor:
        """The stock inpainting pipeline's mask reading (grayscale, binarised at 0.5), for paste-back."""
        return VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    # ------------------------------------------------------------------ stage 1
    def prepare_masks(self, mask, outpaint, num_frames: int, height: int, width: int) -> list:
        """One mask item per frame for the stock pipeline: the user's masks, or the outpainting mask at output size."""
        if outpaint is not None:
            return [torch.from_numpy(outpaint_mask(height, width, outpaint))[None]] * num_frames
        return mask_frames(mask, num_frames)

    def binary_masks(self, masks: list, height: int, width: int) -> torch.Tensor:
        """(F, 1, H, W) masks exactly as the stock pipeline reads them: resized, grayscale, 1 where >= 0.5."""
        if isinstance(masks[0], PIL.Image.Image):
            return self.mask_processor.preprocess(masks, height=height, width=width)
        return self.mask_processor.preprocess(torch.stack(masks), height=height, width=width)

    def generate_frames(self, call, embeds) -> torch.Tensor:
        """Stage 1: SD inpainting on every source frame with its mask, for every video."""
        pipe = self.stock_pipeline(StableDiffusionInpaintPipeline, "Frame-wise inpainting (SD Inpainting)")
        call.source = self.source_pixels(call.video, call.height, call.width, call.resize_mode)
        masks = call.masks

        def frame_inputs(frames):
            chunk = [masks[f] for f in frames]
            mask_image = chunk if isinstance(chunk[0], PIL.Image.Image) else torch.stack(chunk)
            return {"image": call.source[frames], "mask_image": mask_image}

        return self.run_frame_batches(pipe, call, embeds, frame_inputs, height=call.height, width=call.width)

    # ------------------------------------------------------------------ paste-back
    def paste_source_back(
        self,
        latents: torch.Tensor,
        source: torch.Tensor,
        masks: torch.Tensor,
        feather: int,
        output_type: str,
        decode_chunk_size: int,
    ):
        """Decode (B, 4, F, h, w) latents and composite the source (F, 3, H, W) in [0, 1] back where the feathered
        mask (F, 1, H, W) is below 1. Where it is 0 the result is the source, bit for bit."""
        with self.stage("decoding"):
            pixels = self.video_processor.denormalize(self.decode_latents(latents, decode_chunk_size).float())
        weight = feather_mask(masks.to(pixels), feather).permute(1, 0, 2, 3)[None]
        source = source.to(pixels).permute(1, 0, 2, 3)[None]
        composite = weight * pixels + (1 - weight) * source
        num_frames = composite.shape[2]
        # Already in [0, 1]: a second denormalisation would round the source pixels.
        return self.video_processor.postprocess_video(
            video=composite, output_type=output_type, do_denormalize=[False] * num_frames
        )

    # ------------------------------------------------------------------ checks
    def check_inputs(self, call):
        """Raises on bad input before any model runs; keeps the per-frame mask items in `call.masks`."""
        video = call.video
        if video is None or count_frames(video) == 0:
            raise ValueError(
                "`video` is required: the source frames (PIL list, np (F, H, W, 3) or (F, 3, H, W) tensor)."
            )
        num_frames = count_frames(video)
        for name in ("prompt", "video_prompt"):
            text = getattr(call, name)
            texts = text if isinstance(text, (list, tuple)) else [text]
            if getattr(call, f"{name}_embeds") is None and not all(isinstance(t, str) for t in texts):
                raise ValueError(f"`{name}` must be a string (it may be empty), got {type(text).__name__}.")
        if call.paste_back and call.output_type == "latent":
            raise ValueError(
                "`paste_back=True` composites source pixels into decoded frames, so it cannot give "
                '`output_type="latent"`; use "np", "pt" or "pil", or set `paste_back=False`.'
            )
        feather = call.paste_back_feather
        if not isinstance(feather, int) or feather < 0:
            raise ValueError(f"`paste_back_feather` must be a non-negative integer (pixels), got {feather!r}.")
        latent_channels = self.vae.config.latent_channels
        self.check_image_model((latent_channels, 2 * latent_channels + 1), "an inpainting UNet (or a plain one)")
        mask, outpaint = call.mask, call.outpaint
        if (mask is None) == (outpaint is None):
            raise ValueError(
                "Pass exactly one of `mask` (a mask video or image, white = regenerate) and `outpaint` "
                "('horizontal', 'vertical' or pixel margins); got " + ("both." if mask is not None else "neither.")
            )
        call.masks = masks = self.prepare_masks(mask, outpaint, num_frames, call.height, call.width)
        if outpaint is not None:
            return
        if len(masks) != num_frames:
            raise ValueError(f"`mask` has {len(masks)} frames but `video` has {num_frames}; pass one mask per frame.")
        video_size = tuple(frame_size(video))
        sizes = {_item_size(m) for m in masks}
        if sizes != {video_size}:
            raise ValueError(
                f"`mask` frames are {sorted(sizes)} (H, W) but the video frames are {video_size}; resize the mask "
                "to the video's size."
            )
        if any(not isinstance(m, PIL.Image.Image) and (m.min() < 0 or m.max() > 1) for m in masks):
            raise ValueError("Float `mask` values must lie in [0, 1] (uint8 masks may use 0-255).")
        if call.resize_mode != "default":
            # Masks follow their frames through "fill" / "crop".
            resized = self.resize_frames(
                [m if isinstance(m, PIL.Image.Image) else m[0].numpy()[..., None].repeat(3, -1) for m in masks],
                call.height,
                call.width,
                call.resize_mode,
            )
            call.masks = [m.convert("L") for m in resized]

    def decode_output(self, call, latents):
        if not call.paste_back:
            return super().decode_output(call, latents)
        return self.paste_source_back(
            latents,
            call.source,
            self.binary_masks(call.masks, call.height, call.width),
            call.paste_back_feather,
            call.output_type,
            call.decode_chunk_size,
        )

    # ------------------------------------------------------------------ call
    @pipeline_call(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        video: FrameInput | None = None,
        prompt: str | list[str] = "",
        mask: FrameInput | PIL.Image.Image | np.ndarray | torch.Tensor | None = None,
        outpaint: str | dict | tuple | None = None,
        mixing_ratio: float = 0.1,
        paste_back: bool = False,
        paste_back_feather: int = 8,
        **shared,
    ):
        r"""
        Inpaint (with `mask`) or outpaint (with `outpaint`) a video.

        Args:
            video (`list[PIL.Image.Image]`, `np.ndarray` `(F, H, W, 3)` or `torch.Tensor` `(F, 3, H, W)` in [0, 1]):
                The source frames.
            prompt (`str` or `list[str]`, defaults to `""`): The inpainting model's prompt for every frame; may be
                empty, as in the original release. N prompts give N videos in one call.
            mask (*optional*): White (>= 0.5) = regenerate, black = keep. One mask per frame: a list of PIL images,
                arrays or tensors; an array or tensor `(F, H, W)` (or `(F, H, W, C)` / `(F, C, H, W)`); or a
                single mask (a PIL image, an `(H, W)` array) for every frame. Frames the size of `video`; uint8
                values in 0-255, floats in [0, 1]. Read like the stock pipeline reads `mask_image`.
            outpaint (`str`, `tuple` or `dict`, *optional*): Instead of `mask`: `"horizontal"` regenerates the top
                and bottom quarters, `"vertical"` the left and right quarters, or pixel margins
                `(top, bottom, left, right)` / `{"top": 64, ...}` of the output frame. See [`outpaint_mask`].
            paste_back (`bool`, defaults to `False`): Composite the source back into the final frames outside the
                mask, feathered over `paste_back_feather` pixels outside it; the original release did not. Not
                available with `output_type="latent"`.
            paste_back_feather (`int`, defaults to 8): Width in pixels of the blend ramp outside the mask; beyond
                it the source pixels are kept exactly. 0 pastes with a hard edge.
            return_idm_frames (`bool`, defaults to `True`): Also decode and return the frame-wise inpaintings
                (never pasted back).

        Examples:

        Returns:
            [`BIVDiffPipelineOutput`] or `tuple` `(frames, idm_frames)`.
        """
        return self.run(locals())
