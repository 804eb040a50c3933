"""Tiny random-weight components of the real model families, for tests and `bivdiff run --tiny`.

Every builder is seeded, needs no download, and returns the same classes the full-size models use, so the
pipelines run the same code paths. The image and video text encoders have different widths on purpose: an
embedding handed to the wrong UNet fails loudly instead of silently broadcasting.
"""

import copy
from functools import partial

import torch
from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, MotionAdapter, T2IAdapter, UNet2DConditionModel,
                       UNet3DConditionModel)
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from bivdiff.models import VidRDUNet3DConditionModel
from bivdiff.schedulers import BIVDiffDDIMInverseScheduler

IMAGE_TEXT_DIM = 32
VIDEO_TEXT_DIM = 24
VAE_SCALE_FACTOR = 2
# Two levels of 8 and 16 channels, one layer each: the smallest SD-shaped networks.
_SMALL = dict(block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=4, norm_num_groups=2)
# SD's block order (attention first, plain last), which T2I-Adapter features assume.
_SD = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=IMAGE_TEXT_DIM, **_SMALL)
_VIDEO = dict(sample_size=16, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
              up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=VIDEO_TEXT_DIM)
# ModelScope's (and VidRD's) GroupNorm width: 32 groups, so 32 channels.
_WIDE = dict(_VIDEO, block_out_channels=(32, 32), layers_per_block=1)


def _seeded(model_class, seed: int = 0, wake: str = "", **kwargs):
    """`model_class(**kwargs)` (a transformers model: of a config of `kwargs`) in eval mode, its weights drawn right
    after `torch.manual_seed(seed)`. `wake`: zero-initialised layers whose names hold it (temporal outputs, a
    ControlNet's) would leave their module idle, so they get small random weights."""
    kwargs = copy.deepcopy(kwargs)  # every model's config gets lists of its own, as if written out for each call
    torch.manual_seed(seed)
    config_class = getattr(model_class, "config_class", None)
    model = model_class(config_class(**kwargs)) if config_class else model_class(**kwargs)
    for name, param in model.named_parameters() if wake else ():
        if wake in name and not param.any():
            torch.nn.init.normal_(param, 0, 0.02)
    return model.eval()


tiny_vae = partial(_seeded, AutoencoderKL, block_out_channels=[8, 16], in_channels=3, out_channels=3,
                   down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                   latent_channels=4, norm_num_groups=2, scaling_factor=0.18215)
tiny_controlnet = partial(_seeded, ControlNetModel, wake="controlnet_", in_channels=4,
                          conditioning_embedding_out_channels=(8, 16), **_SD)
# A ModelScope/ZeroScope-shaped UNet3DConditionModel at the narrow widths of the other tiny models, temporal layers
# awake.
tiny_video_unet = partial(_seeded, UNet3DConditionModel, wake="temp", in_channels=4, out_channels=4, **_VIDEO,
                          **_SMALL)
# VidRD-shaped (temporal convs and in-block temporal attention) and ModelScope-shaped UNets at ModelScope's width,
# their temporal layers awake.
tiny_vidrd_unet = partial(_seeded, VidRDUNet3DConditionModel, wake="temp", attention_head_dim=(2, 2), **_WIDE)
tiny_modelscope_unet = partial(_seeded, UNet3DConditionModel, wake="temp", attention_head_dim=8, **_WIDE)
# An AnimateDiff MotionAdapter for `tiny_unet` (its widths, one layer per block, a mid-block motion module).
tiny_motion_adapter = partial(_seeded, MotionAdapter, block_out_channels=(8, 16), motion_layers_per_block=1,
                              motion_num_attention_heads=2, motion_norm_num_groups=2, motion_max_seq_length=32,
                              use_motion_mid_block=True)


def tiny_text_encoder(hidden_size: int = IMAGE_TEXT_DIM, seed: int = 0):
    return _seeded(CLIPTextModel, seed, bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=hidden_size,
                   intermediate_size=2 * hidden_size, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
                   vocab_size=1000, max_position_embeddings=77)


def tiny_unet(in_channels: int = 4, seed: int = 0):
    """SD-1.5-shaped UNet2DConditionModel; in_channels 8 for InstructPix2Pix, 9 for inpainting."""
    return _seeded(UNet2DConditionModel, seed, sample_size=16, in_channels=in_channels, out_channels=4,
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **_SD)


def tiny_adapter(in_channels: int = 3, seed: int = 0):
    return _seeded(T2IAdapter, seed, in_channels=in_channels, channels=[8, 16], num_res_blocks=1,
                   downscale_factor=VAE_SCALE_FACTOR, adapter_type="full_adapter")


def tiny_tokenizer():
    """A byte-level CLIP tokenizer with no merges: every word splits into characters (514 tokens)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=[], model_max_length=77)


# SD-1.5's DDIM settings, given at construction so `from_config` keeps every key.
_SD15_DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                  timestep_spacing="leading")
sd15_scheduler_config = _SD15_DDIM.copy
tiny_scheduler = partial(DDIMScheduler, **_SD15_DDIM)
tiny_inverse_scheduler = partial(BIVDiffDDIMInverseScheduler, **_SD15_DDIM)


def tiny_video_components(seed: int = 0, video_unet=None) -> dict:
    """The video-model side shared by every BIVDiff pipeline; `video_unet` in place of the ZeroScope-shaped one."""
    video_unet = tiny_video_unet(seed) if video_unet is None else video_unet
    return dict(video_unet=video_unet, video_text_encoder=tiny_text_encoder(VIDEO_TEXT_DIM, seed + 1),
                video_tokenizer=tiny_tokenizer())


def tiny_image_components(seed: int = 0, unet_in_channels: int = 4) -> dict:
    """The SD-1.5-family image side: VAE, text encoder, tokenizer, UNet, scheduler, inverse scheduler."""
    return dict(vae=tiny_vae(seed), text_encoder=tiny_text_encoder(IMAGE_TEXT_DIM, seed), tokenizer=tiny_tokenizer(),
                unet=tiny_unet(unet_in_channels, seed), scheduler=tiny_scheduler(),
                inverse_scheduler=tiny_inverse_scheduler())


def tiny_components_of(key: str, condition_channels: int = 3) -> dict:
    """Tiny stand-ins for the components the catalogue model `key` (`models_resolution.CATALOGUE`) gives a pipeline,
    for `bivdiff run --tiny`; a T2I-Adapter takes `condition_channels`."""
    video = tiny_video_components
    makers = {
        "sd15": tiny_image_components,  # its samplers are replaced by the run's own
        "zeroscope": video,
        "modelscope": lambda: video(video_unet=tiny_modelscope_unet()),
        "vidrd": lambda: video(video_unet=tiny_vidrd_unet()),
        "animatediff": lambda: dict(motion_adapter=tiny_motion_adapter()),
        "instruct-pix2pix": lambda: dict(unet=tiny_unet(8)),
        "sd-inpainting": lambda: dict(unet=tiny_unet(9)),
        "controlnet": lambda: dict(controlnet=tiny_controlnet()),
        "t2iadapter": lambda: dict(adapter=tiny_adapter(condition_channels)),
    }
    family = key.partition("-")[0]
    return makers.get(family if family in ("controlnet", "t2iadapter") else key, dict)()
