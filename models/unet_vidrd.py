"""The VidRD video UNet ("Reuse and Diffuse", arXiv 2309.03549) as a diffusers model.

VidRD inflates Stable Diffusion 2.1-base into a video UNet in a way that no stock diffusers class can hold:

* a ModelScope-style temporal convolution stack follows every ResNet;
* every spatial transformer block gains a temporal self-attention, placed after the cross-attention and before the
  feed-forward, preceded by a sinusoidal frame-position embedding that is added to the residual stream itself;
* the ResNet GroupNorms and the output GroupNorm pool their statistics over all frames of a video, while the
  GroupNorm inside each spatial transformer normalises every frame on its own.

[`VidRDUNet3DConditionModel`] rebuilds that network from diffusers building blocks. Module names follow VidRD's own
so that the `unet.*` tensors of VidRD's `ModelT2V.pth` load strictly once the `unet.` prefix is stripped (see
`conversion_scripts/convert_vidrd_to_diffusers.py`). Tensors are laid out as `(batch, channels, frames, height,
width)` throughout; 2-D operators see the frames folded into the batch.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_3d_condition import UNet3DConditionOutput
from diffusers.models.upsampling import Upsample2D
from diffusers.utils.torch_utils import apply_freeu
from torch import nn

# VidRD's temporal convolutions use GroupNorm(32) whatever `norm_num_groups` says, so every width must be a
# multiple of 32.
TEMPORAL_CONV_GROUPS = 32


def _fold_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W), frames of one video adjacent."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def _unfold_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B*F, C, H, W) -> (B, C, F, H, W); a view, so a following fold costs no copy."""
    bf, c, h, w = x.shape
    return x.reshape(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)


def _as_video(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    # ControlNet-style residuals may come in UNet3DConditionModel's folded (B*F, C, H, W) layout.
    return _unfold_frames(x, num_frames) if x.ndim == 4 else x


@functools.lru_cache(maxsize=64)
def _frame_position_table(num_frames: int, dim: int) -> torch.Tensor:
    # Computed once per (frames, width) in float32 on the CPU, the precision the embedding was trained with.
    if dim % 2 != 0:
        raise ValueError(f"The frame-position embedding needs an even width, got {dim}.")
    position = torch.arange(num_frames, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    table = torch.zeros(num_frames, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


def frame_position_embedding(num_frames: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed sinusoidal embedding of the frame index (base 10000), shape (num_frames, dim).

    Even entries hold sin, odd entries cos, so frame 0 gets (0, 1, 0, 1, ...): it is not zero, and the block adds it
    even to single images.
    """
    return _frame_position_table(num_frames, dim).to(device=device, dtype=dtype)


class FrameConv2d(nn.Conv2d):
    """A 2-D convolution applied to every frame of a (B, C, F, H, W) tensor independently."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        num_frames = hidden_states.shape[2]
        return _unfold_frames(super().forward(_fold_frames(hidden_states)), num_frames)


class VidRDTemporalConvLayer(nn.Module):
    """Residual stack of 4 x [GroupNorm, SiLU, Dropout, Conv3d over frames only] (ModelScope's design).

    The layers live in one flat `convs` list so parameter names match VidRD's checkpoint (norms at 0, 4, 8, 12,
    convolutions at 3, 7, 11, 15). The last convolution starts at zero, making a fresh layer an identity. A single
    frame passes through untouched, so image inputs see a plain image UNet here.
    """

    def __init__(self, channels: int, num_layers: int = 4, dropout: float = 0.1):
        super().__init__()
        layers = []
        for _ in range(num_layers):
            layers += [
                nn.GroupNorm(TEMPORAL_CONV_GROUPS, channels),
                nn.SiLU(),
                nn.Dropout(dropout),
                nn.Conv3d(channels, channels, kernel_size=(3, 1, 1), padding=(1, 0, 0)),
            ]
        self.convs = nn.ModuleList(layers)
        nn.init.zeros_(self.convs[-1].weight)
        nn.init.zeros_(self.convs[-1].bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[2] == 1:
            return hidden_states
        residual = hidden_states
        for layer in self.convs:
            hidden_states = layer(hidden_states)
        return residual + hidden_states


class VidRDResnetBlock3D(nn.Module):
    """SD's ResNet block on video, except that `norm1`/`norm2` take statistics over all frames jointly.

    The GroupNorms see the 5-D tensor, so a video's frames share mean and variance; per-frame SD ResNets would
    normalise each frame on its own and give a different result unless the frames are identical.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int = 32,
        eps: float = 1e-5,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        time_embedding_norm: str = "default",
    ):
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"Unknown time_embedding_norm: {time_embedding_norm}")
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor

        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = FrameConv2d(in_channels, out_channels, kernel_size=3, padding=1)
        temb_out = out_channels * 2 if time_embedding_norm == "scale_shift" else out_channels
        self.time_emb_proj = nn.Linear(temb_channels, temb_out)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = FrameConv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = (
            FrameConv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
        temb = self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None, None]
        if self.time_embedding_norm == "default":
            hidden_states = self.norm2(hidden_states + temb)
        else:
            scale, shift = temb.chunk(2, dim=1)
            hidden_states = self.norm2(hidden_states) * (1 + scale) + shift
        hidden_states = self.conv2(self.dropout(self.nonlinearity(hidden_states)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor


class VidRDTransformerBlock(nn.Module):
    """SD's transformer block with a temporal self-attention between cross-attention and feed-forward.

    Order: spatial self-attention, cross-attention, [+ frame-position embedding, temporal self-attention],
    feed-forward. The temporal attention attends over the frames at each spatial location, with the same heads as
    the spatial ones, no q/k/v bias, and an output projection that starts at zero. The position embedding is added
    to the residual stream itself, so it stays even where the temporal attention contributes nothing, including for
    a single frame, where the attention is skipped but the embedding of frame 0 is still added.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int,
        upcast_attention: bool = False,
        add_temp_attn: bool = True,
        add_temp_embed: bool = True,
    ):
        super().__init__()
        self.add_temp_embed = add_temp_embed
        attn_kwargs = dict(heads=num_attention_heads, dim_head=attention_head_dim, upcast_attention=upcast_attention)

        # Registration order follows VidRD's module so that state dicts list tensors in the same order.
        self.attn1 = Attention(query_dim=dim, bias=False, **attn_kwargs)
        if add_temp_attn:
            self.temp_norm = nn.LayerNorm(dim)
            self.temp_attn = Attention(query_dim=dim, bias=False, **attn_kwargs)
            nn.init.zeros_(self.temp_attn.to_out[0].weight)
            nn.init.zeros_(self.temp_attn.to_out[0].bias)
        else:
            self.temp_attn = None
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = Attention(query_dim=dim, cross_attention_dim=cross_attention_dim, bias=False, **attn_kwargs)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        num_frames: int,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """hidden_states: (B*F, tokens, dim); encoder_hidden_states: (B*F, text tokens, text dim)."""
        cross_attention_kwargs = cross_attention_kwargs or {}
        hidden_states = self.attn1(self.norm1(hidden_states), **cross_attention_kwargs) + hidden_states
        hidden_states = (
            self.attn2(
                self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states, **cross_attention_kwargs
            )
            + hidden_states
        )

        if self.temp_attn is not None:
            bf, tokens, dim = hidden_states.shape
            batch = bf // num_frames
            video = hidden_states.view(batch, num_frames, tokens, dim)
            if self.add_temp_embed:
                pos = frame_position_embedding(num_frames, dim, hidden_states.device, hidden_states.dtype)
                video = video + pos[None, :, None, :]
            if num_frames > 1:
                frames = video.transpose(1, 2).reshape(batch * tokens, num_frames, dim)
                frames = self.temp_attn(self.temp_norm(frames)) + frames
                video = frames.view(batch, tokens, num_frames, dim).transpose(1, 2)
            hidden_states = video.reshape(bf, tokens, dim)

        return self.ff(self.norm3(hidden_states)) + hidden_states


class VidRDTransformer3D(nn.Module):
    """SD's spatial transformer applied frame by frame: per-frame GroupNorm, projection, blocks, residual."""

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        cross_attention_dim: int,
        norm_num_groups: int = 32,
        use_linear_projection: bool = True,
        upcast_attention: bool = False,
        add_temp_attn: bool = True,
        add_temp_embed: bool = True,
    ):
        super().__init__()
        self.use_linear_projection = use_linear_projection
        inner_dim = num_attention_heads * attention_head_dim

        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [
                VidRDTransformerBlock(
                    inner_dim,
                    num_attention_heads,
                    attention_head_dim,
                    cross_attention_dim=cross_attention_dim,
                    upcast_attention=upcast_attention,
                    add_temp_attn=add_temp_attn,
                    add_temp_embed=add_temp_embed,
                )
            ]
        )
        if use_linear_projection:
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """hidden_states: (B, C, F, H, W); encoder_hidden_states already repeated per frame, (B*F, L, D)."""
        num_frames = hidden_states.shape[2]
        residual = _fold_frames(hidden_states)
        bf, _, height, width = residual.shape

        hidden_states = self.norm(residual)
        if self.use_linear_projection:
            hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(bf, height * width, -1)
            hidden_states = self.proj_in(hidden_states)
        else:
            hidden_states = self.proj_in(hidden_states)
            hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(bf, height * width, -1)

        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, num_frames, cross_attention_kwargs)

        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
            hidden_states = hidden_states.reshape(bf, height, width, -1).permute(0, 3, 1, 2)
        else:
            hidden_states = hidden_states.reshape(bf, height, width, -1).permute(0, 3, 1, 2)
            hidden_states = self.proj_out(hidden_states)

        return _unfold_frames(hidden_states + residual, num_frames)


class _CheckpointedBlock(nn.Module):
    """Runs sub-modules through activation checkpointing when `enable_gradient_checkpointing()` asked for it."""

    gradient_checkpointing = False

    def _run(self, module: nn.Module, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)


class VidRDDownBlock3D(_CheckpointedBlock):
    """Down block: per layer resnet -> temporal conv -> (spatio-temporal transformer), then a strided conv.

    `CrossAttnDownBlock3D` in a config is this block with transformers, `DownBlock3D` without.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        add_downsample: bool,
        has_cross_attention: bool,
        num_attention_heads: int,
        cross_attention_dim: int,
        resnet_groups: int,
        resnet_eps: float,
        resnet_time_scale_shift: str,
        downsample_padding: int,
        use_linear_projection: bool,
        upcast_attention: bool,
        add_temp_attn: bool,
        add_temp_embed: bool,
        add_temp_conv: bool,
        temporal_conv_dropout: float,
    ):
        super().__init__()
        self.has_cross_attention = has_cross_attention
        resnets, temp_convs, attentions = [], [], []
        for i in range(num_layers):
            resnets.append(
                VidRDResnetBlock3D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels,
                    groups=resnet_groups,
                    eps=resnet_eps,
                    time_embedding_norm=resnet_time_scale_shift,
                )
            )
            temp_convs.append(VidRDTemporalConvLayer(out_channels, dropout=temporal_conv_dropout))
            if has_cross_attention:
                attentions.append(
                    VidRDTransformer3D(
                        num_attention_heads,
                        out_channels // num_attention_heads,
                        in_channels=out_channels,
                        cross_attention_dim=cross_attention_dim,
                        norm_num_groups=resnet_groups,
                        use_linear_projection=use_linear_projection,
                        upcast_attention=upcast_attention,
                        add_temp_attn=add_temp_attn,
                        add_temp_embed=add_temp_embed,
                    )
                )
        # Registration order follows VidRD's module (attentions, resnets, temp_convs, downsamplers).
        if has_cross_attention:
            self.attentions = nn.ModuleList(attentions)
        self.resnets = nn.ModuleList(resnets)
        self.temp_convs = nn.ModuleList(temp_convs) if add_temp_conv else None
        self.downsamplers = (
            nn.ModuleList(
                [
                    Downsample2D(
                        out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding, name="op"
                    )
                ]
            )
            if add_downsample
            else None
        )
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        output_states = ()
        for i, resnet in enumerate(self.resnets):
            hidden_states = self._run(resnet, hidden_states, temb)
            if self.temp_convs is not None:
                hidden_states = self._run(self.temp_convs[i], hidden_states)
            if self.has_cross_attention:
                hidden_states = self._run(
                    self.attentions[i], hidden_states, encoder_hidden_states, cross_attention_kwargs
                )
            output_states += (hidden_states,)

        if self.downsamplers is not None:
            num_frames = hidden_states.shape[2]
            for downsampler in self.downsamplers:
                hidden_states = _unfold_frames(downsampler(_fold_frames(hidden_states)), num_frames)
            output_states += (hidden_states,)
        return hidden_states, output_states


class VidRDUpBlock3D(_CheckpointedBlock):
    """Up block: per layer concat skip -> resnet -> temporal conv -> (transformer), then nearest-upsample + conv.

    `CrossAttnUpBlock3D` in a config is this block with transformers, `UpBlock3D` without.
    """

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        add_upsample: bool,
        has_cross_attention: bool,
        num_attention_heads: int,
        cross_attention_dim: int,
        resnet_groups: int,
        resnet_eps: float,
        resnet_time_scale_shift: str,
        use_linear_projection: bool,
        upcast_attention: bool,
        add_temp_attn: bool,
        add_temp_embed: bool,
        add_temp_conv: bool,
        temporal_conv_dropout: float,
        resolution_idx: int = 0,
    ):
        super().__init__()
        self.has_cross_attention = has_cross_attention
        self.resolution_idx = resolution_idx
        self.freeu: dict[str, float] | None = None  # FreeU's s1, s2, b1, b2 (`enable_freeu`)
        resnets, temp_convs, attentions = [], [], []
        for i in range(num_layers):
            res_skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in_channels = prev_output_channel if i == 0 else out_channels
            resnets.append(
                VidRDResnetBlock3D(
                    resnet_in_channels + res_skip_channels,
                    out_channels,
                    temb_channels,
                    groups=resnet_groups,
                    eps=resnet_eps,
                    time_embedding_norm=resnet_time_scale_shift,
                )
            )
            temp_convs.append(VidRDTemporalConvLayer(out_channels, dropout=temporal_conv_dropout))
            if has_cross_attention:
                attentions.append(
                    VidRDTransformer3D(
                        num_attention_heads,
                        out_channels // num_attention_heads,
                        in_channels=out_channels,
                        cross_attention_dim=cross_attention_dim,
                        norm_num_groups=resnet_groups,
                        use_linear_projection=use_linear_projection,
                        upcast_attention=upcast_attention,
                        add_temp_attn=add_temp_attn,
                        add_temp_embed=add_temp_embed,
                    )
                )
        if has_cross_attention:
            self.attentions = nn.ModuleList(attentions)
        self.resnets = nn.ModuleList(resnets)
        self.temp_convs = nn.ModuleList(temp_convs) if add_temp_conv else None
        self.upsamplers = (
            nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
            if add_upsample
            else None
        )
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            res_hidden_states = res_hidden_states_tuple[-1]
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            if self.freeu is not None:
                # diffusers' FreeU filters (N, C, H, W) skip features frame by frame: frames go into the batch.
                num_frames = hidden_states.shape[2]
                folded = apply_freeu(
                    self.resolution_idx, _fold_frames(hidden_states), _fold_frames(res_hidden_states), **self.freeu
                )
                hidden_states, res_hidden_states = (_unfold_frames(x, num_frames) for x in folded)
            hidden_states = torch.cat([hidden_states, res_hidden_states], dim=1)
            hidden_states = self._run(resnet, hidden_states, temb)
            if self.temp_convs is not None:
                hidden_states = self._run(self.temp_convs[i], hidden_states)
            if self.has_cross_attention:
                hidden_states = self._run(
                    self.attentions[i], hidden_states, encoder_hidden_states, cross_attention_kwargs
                )

        if self.upsamplers is not None:
            num_frames = hidden_states.shape[2]
            for upsampler in self.upsamplers:
                hidden_states = _unfold_frames(upsampler(_fold_frames(hidden_states), upsample_size), num_frames)
        return hidden_states


class VidRDMidBlock3DCrossAttn(_CheckpointedBlock):
    """resnet -> temporal conv -> transformer -> resnet -> temporal conv."""

    def __init__(
        self,
        in_channels: int,
        temb_channels: int,
        num_attention_heads: int,
        cross_attention_dim: int,
        resnet_groups: int,
        resnet_eps: float,
        resnet_time_scale_shift: str,
        output_scale_factor: float,
        use_linear_projection: bool,
        upcast_attention: bool,
        add_temp_attn: bool,
        add_temp_embed: bool,
        add_temp_conv: bool,
        temporal_conv_dropout: float,
    ):
        super().__init__()
        self.has_cross_attention = True

        def resnet():
            return VidRDResnetBlock3D(
                in_channels,
                in_channels,
                temb_channels,
                groups=resnet_groups,
                eps=resnet_eps,
                output_scale_factor=output_scale_factor,
                time_embedding_norm=resnet_time_scale_shift,
            )

        self.attentions = nn.ModuleList(
            [
                VidRDTransformer3D(
                    num_attention_heads,
                    in_channels // num_attention_heads,
                    in_channels=in_channels,
                    cross_attention_dim=cross_attention_dim,
                    norm_num_groups=resnet_groups,
                    use_linear_projection=use_linear_projection,
                    upcast_attention=upcast_attention,
                    add_temp_attn=add_temp_attn,
                    add_temp_embed=add_temp_embed,
                )
            ]
        )
        self.resnets = nn.ModuleList([resnet(), resnet()])
        self.temp_convs = (
            nn.ModuleList([VidRDTemporalConvLayer(in_channels, dropout=temporal_conv_dropout) for _ in range(2)])
            if add_temp_conv
            else None
        )
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        hidden_states = self._run(self.resnets[0], hidden_states, temb)
        if self.temp_convs is not None:
            hidden_states = self._run(self.temp_convs[0], hidden_states)
        hidden_states = self._run(self.attentions[0], hidden_states, encoder_hidden_states, cross_attention_kwargs)
        hidden_states = self._run(self.resnets[1], hidden_states, temb)
        if self.temp_convs is not None:
            hidden_states = self._run(self.temp_convs[1], hidden_states)
        return hidden_states


_DOWN_BLOCKS = {"CrossAttnDownBlock3D": True, "DownBlock3D": False}
_UP_BLOCKS = {"CrossAttnUpBlock3D": True, "UpBlock3D": False}


class VidRDUNet3DConditionModel(ModelMixin, ConfigMixin):
    r"""
    VidRD's text-to-video UNet: Stable Diffusion 2.1-base inflated with temporal convolutions and in-block temporal
    attention. Input and output are `(batch, channels, frames, height, width)`, like [`UNet3DConditionModel`].

    The defaults describe the released VidRD model (SD-2.1-base widths, 256x256 training resolution).

    Parameters:
        sample_size (`int`, *optional*): Latent height and width used for default image sizes.
        in_channels (`int`): Latent channels in.
        out_channels (`int`): Latent channels out.
        flip_sin_to_cos (`bool`), freq_shift (`int`): Timestep-embedding layout, as in SD.
        down_block_types (`tuple[str]`): `"CrossAttnDownBlock3D"` or `"DownBlock3D"` per resolution.
        mid_block_type (`str`): Only `"UNetMidBlock3DCrossAttn"`.
        up_block_types (`tuple[str]`): `"CrossAttnUpBlock3D"` or `"UpBlock3D"` per resolution.
        block_out_channels (`tuple[int]`): Widths per resolution; multiples of 32.
        layers_per_block (`int`): ResNets per down block (up blocks get one more).
        downsample_padding (`int`), mid_block_scale_factor (`float`), act_fn (`str`): As in SD; `act_fn` must be
            `"silu"`.
        norm_num_groups (`int`), norm_eps (`float`): GroupNorm of the ResNets, transformers and output.
        cross_attention_dim (`int`): Width of the text embeddings.
        attention_head_dim (`int` or `tuple[int]`): The number of attention **heads** per resolution, as in
            SD-2.x's config (each head is `width // heads` wide). Kept under this name so SD-2.1's config maps over.
        use_linear_projection (`bool`): Linear (SD-2.x) rather than 1x1-conv transformer projections.
        upcast_attention (`bool`): Passed to the attention layers.
        resnet_time_scale_shift (`str`): `"default"` or `"scale_shift"`.
        time_cond_proj_dim (`int`, *optional*): Width of an optional `timestep_cond` input.
        add_temp_embed (`bool`): Add the sinusoidal frame-position embedding before every temporal attention.
        add_temp_conv (`bool`): Follow every ResNet with a temporal convolution stack.
        add_temp_attn_only_on_upblocks (`bool`): Give temporal attention only to the up blocks' transformers.
        temporal_conv_dropout (`float`): Dropout inside the temporal convolution stacks (active in train mode only).

    The model starts in eval mode, also when built from a config: VidRD's reference code left the temporal dropout
    on at inference, which makes every denoising step random. Call `.train()` to fine-tune.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["VidRDResnetBlock3D", "VidRDTemporalConvLayer", "VidRDTransformer3D"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = 32,
        in_channels: int = 4,
        out_channels: int = 4,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "DownBlock3D",
        ),
        mid_block_type: str = "UNetMidBlock3DCrossAttn",
        up_block_types: tuple[str, ...] = (
            "UpBlock3D",
            "CrossAttnUpBlock3D",
            "CrossAttnUpBlock3D",
            "CrossAttnUpBlock3D",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1024,
        attention_head_dim: int | tuple[int, ...] = (5, 10, 20, 20),
        use_linear_projection: bool = True,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        time_cond_proj_dim: int | None = None,
        add_temp_embed: bool = True,
        add_temp_conv: bool = True,
        add_temp_attn_only_on_upblocks: bool = False,
        temporal_conv_dropout: float = 0.1,
    ):
        super().__init__()
        if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
            raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length.")
        if mid_block_type != "UNetMidBlock3DCrossAttn":
            raise ValueError(f"Unsupported mid_block_type: {mid_block_type}")
        if act_fn not in ("silu", "swish"):
            raise ValueError(f"Unsupported act_fn: {act_fn}")
        for name in (*down_block_types, *up_block_types):
            if name not in _DOWN_BLOCKS and name not in _UP_BLOCKS:
                raise ValueError(f"Unsupported block type: {name}")
        if add_temp_conv and any(c % TEMPORAL_CONV_GROUPS for c in block_out_channels):
            raise ValueError(f"Temporal convolutions need widths that are multiples of 32, got {block_out_channels}.")
        num_heads = attention_head_dim
        if isinstance(num_heads, int):
            num_heads = (num_heads,) * len(down_block_types)
        if len(num_heads) != len(block_out_channels):
            raise ValueError("attention_head_dim must give one head count per resolution.")

        self.sample_size = sample_size
        time_embed_dim = block_out_channels[0] * 4

        self.conv_in = FrameConv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(
            block_out_channels[0], time_embed_dim, act_fn=act_fn, cond_proj_dim=time_cond_proj_dim
        )

        shared = dict(
            temb_channels=time_embed_dim,
            cross_attention_dim=cross_attention_dim,
            resnet_groups=norm_num_groups,
            resnet_eps=norm_eps,
            resnet_time_scale_shift=resnet_time_scale_shift,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
            add_temp_embed=add_temp_embed,
            add_temp_conv=add_temp_conv,
            temporal_conv_dropout=temporal_conv_dropout,
        )

        # Both block lists are registered before the mid block, as in VidRD, so state dicts keep its tensor order.
        self.down_blocks = nn.ModuleList([])
        self.up_blocks = nn.ModuleList([])
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            self.down_blocks.append(
                VidRDDownBlock3D(
                    in_channels=input_channel,
                    out_channels=output_channel,
                    num_layers=layers_per_block,
                    add_downsample=i < len(block_out_channels) - 1,
                    has_cross_attention=_DOWN_BLOCKS[block_type],
                    num_attention_heads=num_heads[i],
                    downsample_padding=downsample_padding,
                    add_temp_attn=not add_temp_attn_only_on_upblocks,
                    **shared,
                )
            )

        self.mid_block = VidRDMidBlock3DCrossAttn(
            in_channels=block_out_channels[-1],
            num_attention_heads=num_heads[-1],
            output_scale_factor=mid_block_scale_factor,
            add_temp_attn=not add_temp_attn_only_on_upblocks,
            **shared,
        )

        self.num_upsamplers = 0
        reversed_channels = list(reversed(block_out_channels))
        reversed_heads = list(reversed(num_heads))
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            is_final_block = i == len(block_out_channels) - 1
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, len(block_out_channels) - 1)]
            if not is_final_block:
                self.num_upsamplers += 1
            self.up_blocks.append(
                VidRDUpBlock3D(
                    in_channels=input_channel,
                    prev_output_channel=prev_output_channel,
                    out_channels=output_channel,
                    num_layers=layers_per_block + 1,
                    add_upsample=not is_final_block,
                    has_cross_attention=_UP_BLOCKS[block_type],
                    num_attention_heads=reversed_heads[i],
                    add_temp_attn=True,
                    resolution_idx=i,
                    **shared,
                )
            )

        # Statistics over all frames, like the ResNets.
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = FrameConv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

        self.eval()

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float):
        r"""FreeU (arXiv 2309.11497), as [`UNet3DConditionModel.enable_freeu`]: in the two deepest up blocks the
        backbone's first half of channels is scaled by `b1` / `b2` and the skip features' lowest frequencies by `s1` /
        `s2`, frame by frame. It counters the over-smoothing of denoising; FreeU's diffusers port
        (lyn-rgb/FreeU_Diffusers) gives ZeroScope `s1=0.9, s2=0.2, b1=1.2, b2=1.4`.
        """
        for block in self.up_blocks:
            block.freeu = dict(s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self):
        """Turns FreeU off again."""
        for block in self.up_blocks:
            block.freeu = None

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet3DConditionOutput | tuple[torch.Tensor]:
        r"""
        Args:
            sample (`torch.Tensor`): Noisy latents, `(batch, channels, frames, height, width)`.
            timestep (`torch.Tensor`, `float` or `int`): One timestep, or one per batch entry.
            encoder_hidden_states (`torch.Tensor`): Text embeddings, `(batch, tokens, cross_attention_dim)`; shared
                by all frames of a video.
            class_labels (`torch.Tensor`, *optional*): Accepted for signature compatibility; the model has no class
                embedding, as in [`UNet3DConditionModel`].
            timestep_cond (`torch.Tensor`, *optional*): Added to the timestep embedding; needs
                `time_cond_proj_dim`.
            attention_mask (`torch.Tensor`, *optional*): Accepted and ignored, as in [`UNet3DConditionModel`]
                (VidRD never masked text tokens either).
            cross_attention_kwargs (`dict`, *optional*): Passed to the spatial self- and cross-attention processors.
            down_block_additional_residuals (`tuple[torch.Tensor]`, *optional*): Added to the skip connections
                (ControlNet-style); each either 5-D or folded `(batch * frames, C, H, W)`.
            mid_block_additional_residual (`torch.Tensor`, *optional*): Added to the mid-block output.
            return_dict (`bool`): Return a [`UNet3DConditionOutput`] rather than a tuple.
        """
        batch, _, num_frames = sample.shape[:3]
        forward_upsample_size = any(s % (2**self.num_upsamplers) != 0 for s in sample.shape[-2:])
        upsample_size = None

        timesteps = timestep
        if not torch.is_tensor(timesteps):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            if sample.device.type == "mps":
                dtype = torch.float32 if isinstance(timestep, float) else torch.int32
            timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(batch)

        # The sinusoidal projection is always float32; the embedding MLP may run in half precision.
        t_emb = self.time_proj(timesteps).to(dtype=self.dtype)
        emb = self.time_embedding(t_emb, timestep_cond)

        sample = sample.to(self.dtype)
        encoder_hidden_states = encoder_hidden_states.to(self.dtype).repeat_interleave(num_frames, dim=0)

        sample = self.conv_in(sample)

        down_block_res_samples = (sample,)
        for block in self.down_blocks:
            sample, res_samples = block(sample, emb, encoder_hidden_states, cross_attention_kwargs)
            down_block_res_samples += res_samples

        if down_block_additional_residuals is not None:
            down_block_res_samples = tuple(
                res + _as_video(extra, num_frames)
                for res, extra in zip(down_block_res_samples, down_block_additional_residuals, strict=True)
            )

        sample = self.mid_block(sample, emb, encoder_hidden_states, cross_attention_kwargs)
        if mid_block_additional_residual is not None:
            sample = sample + _as_video(mid_block_additional_residual, num_frames)

        for i, block in enumerate(self.up_blocks):
            res_samples = down_block_res_samples[-len(block.resnets) :]
            down_block_res_samples = down_block_res_samples[: -len(block.resnets)]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = down_block_res_samples[-1].shape[-2:]
            sample = block(
                sample,
                res_samples,
                emb,
                encoder_hidden_states=encoder_hidden_states,
                upsample_size=upsample_size,
                cross_attention_kwargs=cross_attention_kwargs,
            )

        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))

        if not return_dict:
            return (sample,)
        return UNet3DConditionOutput(sample=sample)
