"""Tiny random-weight components of the real model families, for tests and `bivdiff run --tiny`.

Every builder is seeded, needs no download, and returns the same classes the full-size models use, so the
pipelines run the same code paths. The image and video text encoders have different widths on purpose: an
embedding handed to the wrong UNet fails loudly instead of silently broadcasting.
"""

from __future__ import annotations

import torch

IMAGE_TEXT_DIM = 32
VIDEO_TEXT_DIM = 24
VAE_SCALE_FACTOR = 2
# Two levels of 8 and 16 channels, one layer each: the smallest SD-shaped networks.
_SMALL = dict(block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=4, norm_num_groups=2)


def tiny_tokenizer():
    """A byte-level CLIP tokenizer with no merges: every word splits into characters (514 tokens)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_text_encoder(hidden_size: int = IMAGE_TEXT_DIM, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        max_position_embeddings=77,
    )
    return CLIPTextModel(config).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
        scaling_factor=0.18215,
    ).eval()


def tiny_unet(in_channels: int = 4, seed: int = 0):
    """SD-1.5-shaped UNet2DConditionModel; in_channels 8 for InstructPix2Pix, 9 for inpainting."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        # SD's order (attention first, plain last), which T2I-Adapter features assume.
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=IMAGE_TEXT_DIM,
        **_SMALL,
    ).eval()


def tiny_controlnet(seed: int = 0):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    return ControlNetModel(
        in_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=IMAGE_TEXT_DIM,
        conditioning_embedding_out_channels=(8, 16),
        **_SMALL,
    ).eval()


def tiny_adapter(in_channels: int = 3, seed: int = 0):
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    return T2IAdapter(
        in_channels=in_channels,
        channels=[8, 16],
        num_res_blocks=1,
        downscale_factor=VAE_SCALE_FACTOR,
        adapter_type="full_adapter",
    ).eval()


def tiny_video_unet(seed: int = 0):
    """ModelScope/ZeroScope-shaped UNet3DConditionModel."""
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    return UNet3DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=VIDEO_TEXT_DIM,
        **_SMALL,
    ).eval()


def sd15_scheduler_config() -> dict:
    """SD-1.5's DDIM settings, given at construction so `from_config` keeps every key."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )


def tiny_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**sd15_scheduler_config())


def tiny_inverse_scheduler():
    from bivdiff.schedulers import BIVDiffDDIMInverseScheduler

    return BIVDiffDDIMInverseScheduler(**sd15_scheduler_config())


def tiny_video_components(seed: int = 0) -> dict:
    """The video-model side shared by every BIVDiff pipeline."""
    return dict(
        video_unet=tiny_video_unet(seed),
        video_text_encoder=tiny_text_encoder(VIDEO_TEXT_DIM, seed=seed + 1),
        video_tokenizer=tiny_tokenizer(),
    )


def tiny_image_components(seed: int = 0, unet_in_channels: int = 4) -> dict:
    """The SD-1.5-family image side: VAE, text encoder, tokenizer, UNet, scheduler, inverse scheduler."""
    return dict(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(IMAGE_TEXT_DIM, seed=seed),
        tokenizer=tiny_tokenizer(),
        unet=tiny_unet(unet_in_channels, seed=seed),
        scheduler=tiny_scheduler(),
        inverse_scheduler=tiny_inverse_scheduler(),
    )


def tiny_vidrd_unet(seed: int = 0):
    """VidRD-shaped UNet (temporal convs and in-block temporal attention); its GroupNorms need widths of 32."""
    from bivdiff.models import VidRDUNet3DConditionModel

    torch.manual_seed(seed)
    unet = VidRDUNet3DConditionModel(
        sample_size=16,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        cross_attention_dim=VIDEO_TEXT_DIM,
        attention_head_dim=(2, 2),
    )
    return _wake_temporal_layers(unet).eval()


def _wake_temporal_layers(unet):
    """Zero-initialised temporal outputs would make the temporal layers idle; give them small random weights."""
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "temp" in name and torch.count_nonzero(param) == 0:
                param.normal_(0, 0.02)
    return unet


def tiny_modelscope_unet(seed: int = 0):
    """ModelScope-shaped UNet3DConditionModel at ModelScope's GroupNorm width (32 groups, so 32 channels)
    with its temporal layers awake, where `tiny_video_unet` keeps the narrow widths of the other tiny models."""
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        block_out_channels=(32, 32),
        layers_per_block=1,
        sample_size=16,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=VIDEO_TEXT_DIM,
        attention_head_dim=8,
    )
    return _wake_temporal_layers(unet).eval()


def tiny_motion_adapter(seed: int = 0):
    """AnimateDiff MotionAdapter for `tiny_unet` (its widths, one layer per block, a mid-block motion module)."""
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    return MotionAdapter(
        block_out_channels=(8, 16),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=2,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    ).eval()


def tiny_animatediff_components(unet, text_encoder, tokenizer, seed: int = 0) -> dict:
    """The AnimateDiff video side for an SD-1.5-family image side: a motion UNet on `unet`'s own spatial weights,
    and the image text encoder and tokenizer as the video ones (AnimateDiff reads SD-1.5's CLIP embeddings)."""
    from bivdiff.models import motion_unet_sharing_weights

    return dict(
        video_unet=motion_unet_sharing_weights(unet, tiny_motion_adapter(seed)),
        video_text_encoder=text_encoder,
        video_tokenizer=tokenizer,
    )
