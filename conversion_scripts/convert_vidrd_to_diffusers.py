"""Convert VidRD's `ModelT2V.pth` into diffusers folders.

`ModelT2V.pth` is a PyTorch-Lightning checkpoint: `{"state_dict": {"unet.<name>": ..., "text_encoder.<name>": ...,
"vae.<name>": ...}, ...}`. Its `unet.` section is the whole video UNet (spatial and temporal layers), so the
converter needs Stable Diffusion 2.1-base only for configs, the tokenizer and any section the checkpoint lacks.

    python conversion_scripts/convert_vidrd_to_diffusers.py \
        --checkpoint checkpoints/VidRD/ModelT2V.pth \
        --sd21 checkpoints/stable-diffusion-2-1-base \
        --output checkpoints/VidRD/diffusers --dtype fp16 --verify

writes into `--output`:

* `video_unet/`: [`VidRDUNet3DConditionModel`] config and safetensors;
* `video_text_encoder/`: the checkpoint's `text_encoder.*` when present, else SD-2.1's text encoder;
* `video_tokenizer/`: SD-2.1's tokenizer;
* `vae/`: only when the checkpoint carries `vae.*` tensors.

Everything is written to a temporary folder beside `--output` and renamed at the end, so a failed run leaves no
partial output. The functions are importable for tests and scripts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import shutil
import sys
import uuid
import zipfile
from pathlib import Path

import torch

logger = logging.getLogger("convert_vidrd_to_diffusers")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# VidRD was trained at 256x256 pixels, i.e. 32x32 latents; SD-2.1-base's own config says 64.
VIDRD_SAMPLE_SIZE = 32

# The Lightning module attributes whose tensors the converter knows what to do with.
SECTIONS = ("unet", "text_encoder", "vae")

# SD-2.1 UNet config entries the VidRD UNet takes over unchanged.
_UNET_KEYS = (
    "in_channels",
    "out_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "use_linear_projection",
    "upcast_attention",
    "resnet_time_scale_shift",
)

# Entries VidRD's UNet has no counterpart for: the SD config must leave them at these values.
_UNET_DEFAULTS = {
    "center_input_sample": (False,),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "transformer_layers_per_block": (1,),
    "reverse_transformer_layers_per_block": (None,),
    "attention_type": ("default",),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "dropout": (0.0,),
}

_BLOCK_TYPES = {
    "CrossAttnDownBlock2D": "CrossAttnDownBlock3D",
    "DownBlock2D": "DownBlock3D",
    "CrossAttnUpBlock2D": "CrossAttnUpBlock3D",
    "UpBlock2D": "UpBlock3D",
}

_MAX_LISTED = 50


class ConversionError(RuntimeError):
    """A checkpoint or model folder that cannot be converted; the message says why."""


def _listing(title: str, names) -> str:
    names = sorted(names)
    shown = "\n".join(f"  {n}" for n in names[:_MAX_LISTED])
    more = f"\n  ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{title} ({len(names)}):\n{shown}{more}"


def _corrupt(path: Path, err: Exception) -> ConversionError:
    detail = " ".join(str(err).split())[:300]
    return ConversionError(
        f"{path} is truncated or corrupt and cannot be read as a PyTorch checkpoint ({path.stat().st_size} bytes); "
        f"download it again. Reader error: {type(err).__name__}: {detail}"
    )


def load_checkpoint(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a Lightning (`{"state_dict": {...}}`) or plain state-dict checkpoint into a flat name -> tensor dict.

    Only tensors and plain containers are unpickled unless `allow_unsafe_pickle` is set, because unpickling
    arbitrary objects runs code from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"Checkpoint not found: {path}")

    # Memory-mapping keeps a multi-GB checkpoint out of RAM until its tensors are used; only the zip format has it.
    kwargs = {"map_location": "cpu", "weights_only": not allow_unsafe_pickle}
    if zipfile.is_zipfile(path):
        kwargs["mmap"] = True
    try:
        obj = torch.load(path, **kwargs)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise ConversionError(
                f"{path} contains pickled Python objects besides tensors ({refused[1]}; Lightning checkpoints may "
                "store hyper-parameters this way), and unpickling them can execute code from the file. Pass "
                "--allow-unsafe-pickle (allow_unsafe_pickle=True) only if you trust the file."
            ) from err
        raise _corrupt(path, err) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as err:
        raise _corrupt(path, err) from err

    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{path} holds no state dict (found {type(obj).__name__}).")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ConversionError(_listing(f"{path}: state dict entries that are not tensors", not_tensors))
    return obj


def split_sections(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    """Split Lightning keys by module attribute: `unet.x` -> sections["unet"]["x"].

    Returns the sections and the tensor count of every other top-level prefix (such as VidRD's evaluation-only
    `clip.` model), which the converter ignores.
    """
    sections: dict[str, dict[str, torch.Tensor]] = {}
    ignored: dict[str, int] = {}
    for key, value in state_dict.items():
        prefix, _, rest = key.partition(".")
        if prefix in SECTIONS and rest:
            sections.setdefault(prefix, {})[rest] = value
        else:
            ignored[prefix] = ignored.get(prefix, 0) + 1
    if "unet" not in sections:
        raise ConversionError(
            "The checkpoint has no `unet.*` tensors; is it VidRD's ModelT2V.pth? Top-level prefixes found: "
            + ", ".join(sorted(ignored))
        )
    return sections, ignored


def unet_config_from_sd21(sd21_unet_config: dict, sample_size: int = VIDRD_SAMPLE_SIZE) -> dict:
    """The [`VidRDUNet3DConditionModel`] config VidRD derives from SD-2.1's UNet config, with its temporal switches.

    SD-2.x configs give the number of heads under `attention_head_dim`; a config that uses `num_attention_heads`
    takes precedence.
    """
    cfg = dict(sd21_unet_config)
    unsupported = []
    for key, allowed in _UNET_DEFAULTS.items():
        if key not in cfg:
            continue
        value = cfg[key]
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v not in allowed for v in values):
            unsupported.append(f"{key}={value!r}")
    if unsupported:
        raise ConversionError(
            "The SD UNet config has settings VidRD's UNet does not support: " + ", ".join(unsupported)
        )

    try:
        down = [_BLOCK_TYPES[t] for t in cfg["down_block_types"]]
        up = [_BLOCK_TYPES[t] for t in cfg["up_block_types"]]
    except KeyError as err:
        raise ConversionError(f"Unsupported UNet block type in the SD config: {err.args[0]}") from err

    config = {key: cfg[key] for key in _UNET_KEYS if key in cfg}
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    config.update(
        sample_size=sample_size,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=heads,
        add_temp_embed=True,
        add_temp_conv=True,
    )
    for key in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim"):
        if isinstance(config[key], list):
            config[key] = tuple(config[key])
    return config


def _load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Load every tensor of `model` from `state_dict` and nothing else, or raise listing the differences.

    `model` may hold its parameters on the meta device: the checkpoint tensors are assigned, not copied. Entries
    that are non-persistent buffers of `model` (such as CLIP's `position_ids`, saved by older transformers) are
    dropped since the model recomputes them.
    """
    expected = model.state_dict()
    non_persistent = {name for name, _ in model.named_buffers()} - set(expected)
    state_dict = {k: v for k, v in state_dict.items() if k not in non_persistent}

    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"The checkpoint's {what} tensors do not match the model; nothing was written."]
        if missing:
            parts.append(_listing("Missing from the checkpoint", missing))
        if unexpected:
            parts.append(_listing("Unexpected in the checkpoint", unexpected))
        if mismatched:
            parts.append(_listing("Shape mismatches", mismatched))
        raise ConversionError("\n".join(parts))

    model.load_state_dict(state_dict, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ConversionError(_listing(f"{what} tensors left uninitialised", leftover))
    return model


def build_unet(config: dict, state_dict: dict[str, torch.Tensor]):
    """A [`VidRDUNet3DConditionModel`] holding exactly the checkpoint's UNet tensors, in eval mode."""
    from accelerate import init_empty_weights

    from bivdiff.models import VidRDUNet3DConditionModel

    with init_empty_weights(include_buffers=False):
        unet = VidRDUNet3DConditionModel.from_config(config)
    return _load_strict(unet, state_dict, "UNet").eval()


def _match_text_model_prefix(state_dict: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    # transformers 5 dropped CLIPTextModel's `text_model.` wrapper; checkpoints written by 4.x still carry it.
    prefix = "text_model."
    has_prefix = any(k.startswith(prefix) for k in state_dict)
    wants_prefix = any(k.startswith(prefix) for k in expected)
    if has_prefix and not wants_prefix:
        return {k.removeprefix(prefix): v for k, v in state_dict.items()}
    if wants_prefix and not has_prefix:
        return {prefix + k: v for k, v in state_dict.items()}
    return state_dict


def build_text_encoder(config_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor]):
    """A `CLIPTextModel` with SD-2.1's config and the checkpoint's (possibly fine-tuned) text-encoder tensors."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(config_dir)
    with init_empty_weights(include_buffers=False):
        model = CLIPTextModel(config)
    expected = set(model.state_dict()) | {n for n, _ in model.named_buffers()}
    return _load_strict(model, _match_text_model_prefix(state_dict, expected), "text encoder").eval()


_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_old_vae_attention(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # VidRD's diffusers (0.14) named the VAE's mid-block attention query/key/value/proj_attn.
    pattern = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")

    def rename(key: str) -> str:
        m = pattern.match(key)
        return f"{m[1]}{_OLD_VAE_ATTENTION[m[2]]}.{m[3]}" if m else key

    return {rename(k): v for k, v in state_dict.items()}


def build_vae(config_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor]):
    """An `AutoencoderKL` with SD-2.1's config and the checkpoint's VAE tensors."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights(include_buffers=False):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir))
    return _load_strict(vae, _rename_old_vae_attention(state_dict), "VAE").eval()


def _check_sd21(sd21: Path, need_text_encoder: bool, need_vae: bool) -> None:
    needed = ["unet/config.json", "tokenizer", "text_encoder/config.json"]
    if need_vae:
        needed.append("vae/config.json")
    missing = [n for n in needed if not (sd21 / n).exists()]
    if (
        need_text_encoder
        and not any((sd21 / "text_encoder").glob("*.safetensors"))
        and not any((sd21 / "text_encoder").glob("*.bin"))
    ):
        missing.append("text_encoder weights (the checkpoint has no text_encoder.* tensors)")
    if missing:
        raise ConversionError(
            f"{sd21} is not a complete stable-diffusion-2-1-base folder; missing: {', '.join(missing)}"
        )


def _verify_inputs(unet, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = unet.config
    generator = torch.Generator().manual_seed(0)
    side = 2 ** (len(cfg.block_out_channels) - 1) * 2
    return {
        "sample": torch.randn(1, cfg.in_channels, 2, side, side, generator=generator).to(device, dtype),
        "timestep": torch.tensor([500], device=device),
        "encoder_hidden_states": torch.randn(1, 8, cfg.cross_attention_dim, generator=generator).to(device, dtype),
    }


@torch.no_grad()
def verify_unet(in_memory, folder: str | os.PathLike, device: str = "cpu") -> float:
    """Reload the saved UNet and check it equals `in_memory`: every tensor, eval mode, one forward pass.

    Returns the largest absolute output difference. Half precision runs in float32 on the CPU, where half kernels
    are slow or missing.
    """
    from bivdiff.models import VidRDUNet3DConditionModel

    device = torch.device(device)
    dtype = in_memory.dtype
    run_dtype = torch.float32 if device.type == "cpu" and dtype != torch.float32 else dtype
    reloaded = VidRDUNet3DConditionModel.from_pretrained(folder, torch_dtype=dtype)
    if reloaded.training:
        raise ConversionError("The reloaded UNet is in train mode.")

    saved, kept = reloaded.state_dict(), in_memory.state_dict()
    if saved.keys() != kept.keys():
        raise ConversionError("The saved UNet has different tensors than the converted one.")
    differing = [k for k in kept if saved[k].dtype != kept[k].dtype or not torch.equal(saved[k], kept[k])]
    if differing:
        raise ConversionError(_listing("Saved UNet tensors differ from the converted ones", differing))

    outputs = []
    for model in (in_memory, reloaded):
        original_device = next(model.parameters()).device
        _cast(model, run_dtype).to(device)
        inputs = _verify_inputs(model, device, run_dtype)
        outputs.append(model(**inputs).sample.float().cpu())
        _cast(model, dtype).to(original_device)
        del inputs
    del reloaded
    if not torch.isfinite(outputs[0]).all():
        raise ConversionError("The converted UNet produced non-finite values.")
    max_diff = (outputs[0] - outputs[1]).abs().max().item()
    tolerance = 1e-5 if run_dtype == torch.float32 else 1e-3
    if not max_diff <= tolerance:
        raise ConversionError(f"The reloaded UNet's output differs by {max_diff:.3g} (tolerance {tolerance}).")
    return max_diff


def convert(
    checkpoint: str | os.PathLike,
    sd21: str | os.PathLike,
    output: str | os.PathLike,
    dtype: str = "fp32",
    device: str = "cpu",
    allow_unsafe_pickle: bool = False,
    verify: bool = False,
    overwrite: bool = False,
    sample_size: int = VIDRD_SAMPLE_SIZE,
) -> Path:
    """Convert `checkpoint` (VidRD's ModelT2V.pth) into diffusers folders under `output`; see the module docstring."""
    from transformers import CLIPTextModel, CLIPTokenizer

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    sd21, output = Path(sd21), Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConversionError(f"{output} exists and is not empty; pass --overwrite to replace it.")

    state_dict = load_checkpoint(checkpoint, allow_unsafe_pickle=allow_unsafe_pickle)
    sections, ignored = split_sections(state_dict)
    for prefix, count in sorted(ignored.items()):
        logger.info("Ignoring %d tensors under '%s.' (not part of the video model).", count, prefix)
    _check_sd21(sd21, need_text_encoder="text_encoder" not in sections, need_vae="vae" in sections)

    # Build everything before writing anything, so a mismatch aborts with no output at all.
    unet_config = unet_config_from_sd21(_read_config(sd21 / "unet"), sample_size=sample_size)
    unet = _cast(build_unet(unet_config, sections["unet"]), torch_dtype)
    logger.info("UNet: %d tensors, %.1f M parameters.", len(sections["unet"]), _millions(unet))
    if "text_encoder" in sections:
        text_encoder = _cast(build_text_encoder(sd21 / "text_encoder", sections["text_encoder"]), torch_dtype)
        logger.info("Text encoder: from the checkpoint (%d tensors).", len(sections["text_encoder"]))
    else:
        text_encoder = _cast(CLIPTextModel.from_pretrained(sd21 / "text_encoder"), torch_dtype).eval()
        logger.info("Text encoder: the checkpoint has none; using SD-2.1's.")
    tokenizer = CLIPTokenizer.from_pretrained(sd21 / "tokenizer")
    vae = _cast(build_vae(sd21 / "vae", sections["vae"]), torch_dtype) if "vae" in sections else None
    if vae is not None:
        logger.info("VAE: from the checkpoint (%d tensors).", len(sections["vae"]))

    output.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its folder is private (0700) and would stay so after the rename.
    staging = output.parent / f".{output.name}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        unet.save_pretrained(staging / "video_unet")
        text_encoder.save_pretrained(staging / "video_text_encoder")
        tokenizer.save_pretrained(staging / "video_tokenizer")
        if vae is not None:
            vae.save_pretrained(staging / "vae")
        if verify:
            max_diff = verify_unet(unet, staging / "video_unet", device=device)
            logger.info("Verified: the reloaded UNet matches (max |diff| %.3g on %s).", max_diff, device)
        _replace_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Wrote %s", output)
    return output


def _read_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"Missing {config_file}")
    with open(config_file) as f:
        return json.load(f)


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # Module.float()/half() rather than .to(dtype), which makes diffusers models log a spurious warning.
    casts = {torch.float32: model.float, torch.float16: model.half, torch.bfloat16: model.bfloat16}
    return casts[dtype]()


def _millions(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        backup = target.with_name(f".{target.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        target.rename(backup)
        new.rename(target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        new.rename(target)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="VidRD's ModelT2V.pth")
    parser.add_argument("--sd21", required=True, help="stable-diffusion-2-1-base folder (configs, tokenizer)")
    parser.add_argument("--output", required=True, help="folder to write video_unet/, video_text_encoder/, ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="precision of the saved weights")
    parser.add_argument("--device", default="cpu", help="device for the --verify forward pass (cpu, cuda, ...)")
    parser.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="also unpickle non-tensor objects in the checkpoint (runs code from the file; trusted files only)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="reload the saved UNet and compare weights and one forward pass before finishing (holds two UNets)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    parser.add_argument(
        "--sample-size", type=int, default=VIDRD_SAMPLE_SIZE, help="latent size recorded in the UNet config"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        convert(
            args.checkpoint,
            args.sd21,
            args.output,
            dtype=args.dtype,
            device=args.device,
            allow_unsafe_pickle=args.allow_unsafe_pickle,
            verify=args.verify,
            overwrite=args.overwrite,
            sample_size=args.sample_size,
        )
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
