"""An AnimateDiff `UNetMotionModel` whose spatial layers are the image UNet's own modules.

`UNetMotionModel.from_unet2d` copies every spatial weight of the SD-1.5 UNet into a new model: with BIVDiff's image
model and AnimateDiff built on the same checkpoint, that is a second 0.86 B-parameter copy of the same numbers.
Here the motion UNet's skeleton comes from `from_unet2d` itself (built on the meta device, so nothing is allocated
or initialised), then each spatial submodule is replaced by the image UNet's module object and each motion module
by the adapter's. Only the motion modules add memory, and anything done to the image UNet later (a fused LoRA, a
PEFT adapter, a weight edited in place, a move to another device or dtype) is seen by the motion UNet as well.
"""

from __future__ import annotations

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

# Blocks of the motion UNet that mix spatial submodules (taken from the image UNet) with motion modules.
_BLOCK_LISTS = ("down_blocks", "up_blocks")
_MOTION = "motion_modules"


def _layout(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def _adopt(skeleton: torch.nn.Module, owner: torch.nn.Module, where: str) -> torch.nn.Module:
    """`owner`, after checking it has the tensor names and shapes `from_unet2d` would have loaded into `skeleton`."""
    if _layout(skeleton) != _layout(owner):
        raise ValueError(
            f"The image UNet's `{where}` does not match the motion UNet's layout; the motion adapter was made for "
            "another UNet architecture."
        )
    return owner


def _share_block(block: torch.nn.Module, image_block: torch.nn.Module, motion_block, where: str, like) -> None:
    """Fills `block`'s children: motion modules from `motion_block` (moved to `like`'s device and dtype), every
    other child from `image_block`."""
    for name, child in list(block.named_children()):
        if name == _MOTION:
            if motion_block is None or not hasattr(motion_block, _MOTION):
                raise ValueError(f"The motion adapter has no motion modules for `{where}`.")
            motion = _adopt(child, getattr(motion_block, _MOTION), f"{where}.{name}")
            # In place, so the adapter keeps the same tensors; a no-op when it already matches the image UNet.
            setattr(block, name, motion.to(device=like.device, dtype=like.dtype))
        elif not hasattr(image_block, name):
            raise ValueError(f"The image UNet's `{where}` has no `{name}`; it is not an SD-style UNet.")
        else:
            setattr(block, name, _adopt(child, getattr(image_block, name), f"{where}.{name}"))


def motion_unet_sharing_weights(unet: UNet2DConditionModel, motion_adapter: MotionAdapter) -> UNetMotionModel:
    r"""
    Builds the AnimateDiff UNet of `unet` + `motion_adapter` without copying `unet`'s weights.

    The result equals `UNetMotionModel.from_unet2d(unet, motion_adapter)` in architecture and outputs, but its
    spatial layers are `unet`'s own modules and its motion modules are `motion_adapter`'s: no tensor is copied.
    Saving it (`save_pretrained`) writes a complete, ordinary `UNetMotionModel`.

    Args:
        unet (`UNet2DConditionModel`): the SD-1.5-family image UNet, 4 input channels.
        motion_adapter (`MotionAdapter`): AnimateDiff motion modules made for that UNet architecture.

    Example:
        ```py
        >>> from diffusers import MotionAdapter, StableDiffusionPipeline
        >>> from bivdiff.models import motion_unet_sharing_weights

        >>> sd = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
        >>> adapter = MotionAdapter.from_pretrained("guoyww/animatediff-motion-adapter-v1-5-3")
        >>> video_unet = motion_unet_sharing_weights(sd.unet, adapter)
        >>> video_unet.down_blocks[0].resnets[0] is sd.unet.down_blocks[0].resnets[0]
        True
        ```
    """
    if motion_adapter.config.get("conv_in_channels"):
        # PIA adapters bring their own wider conv_in, so the input layer could not be the image UNet's.
        raise ValueError("Motion adapters with their own `conv_in` (PIA) cannot share the image UNet's weights.")
    with torch.device("meta"):
        model = UNetMotionModel.from_unet2d(unet, motion_adapter, load_weights=False)

    like = next(unet.parameters())
    for name, child in list(model.named_children()):
        if name in _BLOCK_LISTS:
            image_blocks, motion_blocks = getattr(unet, name), getattr(motion_adapter, name)
            for i, block in enumerate(child):
                _share_block(block, image_blocks[i], motion_blocks[i], f"{name}.{i}", like)
        elif name == "mid_block":
            _share_block(child, unet.mid_block, motion_adapter.mid_block, name, like)
        else:
            setattr(model, name, _adopt(child, getattr(unet, name), name))

    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"Motion UNet tensors without a source: {', '.join(left[:5])}.")
    return model.train(unet.training)
