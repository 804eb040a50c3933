"""The ModelT2V.pth -> diffusers converter, on tiny Lightning-style checkpoints and a tiny SD-2.1 folder."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from script_helpers import load_script

from bivdiff.models import VidRDUNet3DConditionModel
from bivdiff.tiny_models import VIDEO_TEXT_DIM, tiny_text_encoder, tiny_tokenizer, tiny_vae

ROOT = Path(__file__).resolve().parents[1]
KEY_MANIFEST = ROOT / "tests" / "fixtures" / "vidrd_unet_keys_sd21.json"

# stabilityai/stable-diffusion-2-1-base unet/config.json
SD21_BASE_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.10.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}


conv = load_script("convert_vidrd_to_diffusers")


@pytest.fixture(scope="module")
def sd21(tmp_path_factory):
    """A stable-diffusion-2-1-base-shaped folder with tiny components (VidRD needs widths that are multiples of 32)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("sd21")
    UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=VIDEO_TEXT_DIM,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=32,
    ).save_config(root / "unet")
    tiny_text_encoder(VIDEO_TEXT_DIM, seed=0).save_pretrained(root / "text_encoder")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    tiny_vae(seed=0).save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def unet_weights(sd21):
    """Random VidRD UNet tensors for the tiny config, with the zero-initialised temporal outputs made non-zero."""
    config = conv.unet_config_from_sd21(json.loads((sd21 / "unet" / "config.json").read_text()))
    torch.manual_seed(1)
    unet = VidRDUNet3DConditionModel.from_config(config)
    weights = unet.state_dict()
    for key in weights:
        if ".temp_attn.to_out." in key or ".convs.15." in key:
            weights[key] = torch.randn_like(weights[key]) * 0.05
    return weights


def _old_transformers_text_encoder(seed=1):
    # transformers 4.x (VidRD's 4.30) keys: a `text_model.` wrapper and a persistent position_ids buffer.
    model = tiny_text_encoder(VIDEO_TEXT_DIM, seed=seed)
    weights = {f"text_model.{k}": v for k, v in model.state_dict().items()}
    weights["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return model, weights


def _old_diffusers_vae(seed=1):
    # diffusers 0.14 named the VAE attention query/key/value/proj_attn.
    model = tiny_vae(seed=seed)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    weights = {}
    for key, value in model.state_dict().items():
        for new, old in renames.items():
            if ".attentions." in key and new in key:
                key = key.replace(new, old)
        weights[key] = value
    assert any(".proj_attn." in k for k in weights)
    return model, weights


def _lightning_checkpoint(path, unet_weights, text_encoder=None, vae=None, extra=None, drop=(), add=None):
    state = {f"unet.{k}": v for k, v in unet_weights.items() if k not in drop}
    state.update({f"unet.{k}": v for k, v in (add or {}).items()})
    for prefix, weights in (("text_encoder", text_encoder), ("vae", vae)):
        state.update({f"{prefix}.{k}": v for k, v in (weights or {}).items()})
    # VidRD's Lightning module also holds an evaluation-only CLIP model.
    state["clip.logit_scale"] = torch.tensor(4.6)
    checkpoint = {"state_dict": state, "epoch": 3, "global_step": 1200, **(extra or {})}
    torch.save(checkpoint, path)
    return path


def _no_leftovers(parent: Path, output: Path):
    assert not output.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{output.name}")]


def _forward(unet):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return unet(
            torch.randn(1, 4, 3, 8, 8, generator=g), 400, torch.randn(1, 6, VIDEO_TEXT_DIM, generator=g)
        ).sample


def test_round_trip_with_text_encoder_and_vae(tmp_path, sd21, unet_weights):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    text_model, text_weights = _old_transformers_text_encoder()
    vae_model, vae_weights = _old_diffusers_vae()
    ckpt = _lightning_checkpoint(tmp_path / "ModelT2V.pth", unet_weights, text_weights, vae_weights)
    out = conv.convert(ckpt, sd21, tmp_path / "vidrd", verify=True)

    assert sorted(p.name for p in out.iterdir()) == ["vae", "video_text_encoder", "video_tokenizer", "video_unet"]
    assert (out / "video_unet" / "diffusion_pytorch_model.safetensors").is_file()

    unet = VidRDUNet3DConditionModel.from_pretrained(out / "video_unet")
    assert not unet.training
    assert unet.config.sample_size == 32 and unet.config.add_temp_conv and unet.config.add_temp_embed
    saved = unet.state_dict()
    assert saved.keys() == unet_weights.keys()
    assert all(torch.equal(saved[k], unet_weights[k]) for k in saved)
    reference = VidRDUNet3DConditionModel.from_config(unet.config)
    reference.load_state_dict(unet_weights)
    assert torch.equal(_forward(unet), _forward(reference))

    text_encoder = CLIPTextModel.from_pretrained(out / "video_text_encoder")
    assert not text_encoder.training
    for key, value in text_model.state_dict().items():
        assert torch.equal(text_encoder.state_dict()[key], value), key
    ids = torch.tensor([[512, 40, 41, 513]])
    with torch.no_grad():
        assert torch.equal(text_encoder(ids).last_hidden_state, text_model(ids).last_hidden_state)

    vae = AutoencoderKL.from_pretrained(out / "vae")
    for key, value in vae_model.state_dict().items():
        assert torch.equal(vae.state_dict()[key], value), key

    tokenizer = CLIPTokenizer.from_pretrained(out / "video_tokenizer")
    assert tokenizer("a cat").input_ids == tiny_tokenizer()("a cat").input_ids
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_checkpoint_without_text_encoder_or_vae_uses_sd21_text_encoder(tmp_path, sd21, unet_weights):
    from transformers import CLIPTextModel

    ckpt = _lightning_checkpoint(tmp_path / "ModelT2V.pth", unet_weights)
    out = conv.convert(ckpt, sd21, tmp_path / "vidrd", dtype="fp16")

    assert sorted(p.name for p in out.iterdir()) == ["video_text_encoder", "video_tokenizer", "video_unet"]
    saved = load_file(out / "video_unet" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == unet_weights.keys()
    assert all(v.dtype == torch.float16 and torch.equal(v, unet_weights[k].half()) for k, v in saved.items())
    text_encoder = CLIPTextModel.from_pretrained(out / "video_text_encoder")
    sd21_text_encoder = tiny_text_encoder(VIDEO_TEXT_DIM, seed=0)
    for key, value in sd21_text_encoder.state_dict().items():
        assert torch.equal(text_encoder.state_dict()[key].float(), value.half().float()), key


def test_verify_in_half_precision(tmp_path, sd21, unet_weights, monkeypatch):
    ckpt = _lightning_checkpoint(tmp_path / "ModelT2V.pth", unet_weights)
    conv.convert(ckpt, sd21, tmp_path / "vidrd", dtype="fp16", verify=True)

    # A save that silently changes one weight (a disk or serialisation fault) must abort the conversion.
    from safetensors.torch import save_file

    save = VidRDUNet3DConditionModel.save_pretrained

    def corrupting_save(self, folder, **kwargs):
        save(self, folder, **kwargs)
        path = Path(folder) / "diffusion_pytorch_model.safetensors"
        tensors = load_file(path)
        tensors["conv_in.weight"] = tensors["conv_in.weight"] + 0.5
        save_file(tensors, path)

    monkeypatch.setattr(VidRDUNet3DConditionModel, "save_pretrained", corrupting_save)
    with pytest.raises(conv.ConversionError, match=r"differ[\s\S]*conv_in.weight"):
        conv.convert(ckpt, sd21, tmp_path / "corrupt", dtype="fp16", verify=True)
    _no_leftovers(tmp_path, tmp_path / "corrupt")
    conv.convert(ckpt, sd21, tmp_path / "unchecked", dtype="fp16")  # without --verify nothing notices


def test_missing_and_unexpected_tensors_abort_with_their_names(tmp_path, sd21, unet_weights):
    dropped = "mid_block.temp_convs.1.convs.15.weight"
    bogus = {"down_blocks.0.attentions.0.transformer_blocks.0.temp_proj.weight": torch.zeros(2)}
    ckpt = _lightning_checkpoint(tmp_path / "ModelT2V.pth", unet_weights, drop=(dropped,), add=bogus)
    with pytest.raises(conv.ConversionError) as err:
        conv.convert(ckpt, sd21, tmp_path / "vidrd")
    message = str(err.value)
    assert "Missing from the checkpoint (1)" in message and dropped in message
    assert "Unexpected in the checkpoint (1)" in message and next(iter(bogus)) in message
    _no_leftovers(tmp_path, tmp_path / "vidrd")


def test_shape_mismatch_aborts(tmp_path, sd21, unet_weights):
    key = "conv_in.weight"
    weights = {**unet_weights, key: torch.zeros(32, 4, 1, 1)}
    ckpt = _lightning_checkpoint(tmp_path / "ModelT2V.pth", weights)
    with pytest.raises(conv.ConversionError, match=r"Shape mismatches \(1\)[\s\S]*conv_in.weight"):
        conv.convert(ckpt, sd21, tmp_path / "vidrd")
    _no_leftovers(tmp_path, tmp_path / "vidrd")


def test_truncated_checkpoint_is_refused_clearly(tmp_path, sd21, unet_weights):
    ckpt = _lightning_checkpoint(tmp_path / "ModelT2V.pth", unet_weights)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(conv.ConversionError, match="truncated or corrupt"):
        conv.convert(ckpt, sd21, tmp_path / "vidrd")
    _no_leftovers(tmp_path, tmp_path / "vidrd")

    ckpt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(conv.ConversionError, match="truncated or corrupt"):
        conv.load_checkpoint(ckpt)


def test_pickled_objects_need_explicit_consent(tmp_path, sd21, unet_weights):
    # Older Lightning versions stored hyper-parameters as an argparse.Namespace.
    extra = {"hyper_parameters": argparse.Namespace(lr=1e-4, add_temp_conv=True)}
    ckpt = _lightning_checkpoint(tmp_path / "ModelT2V.pth", unet_weights, extra=extra)
    with pytest.raises(conv.ConversionError, match="--allow-unsafe-pickle") as err:
        conv.convert(ckpt, sd21, tmp_path / "vidrd")
    assert "Namespace" in str(err.value)
    _no_leftovers(tmp_path, tmp_path / "vidrd")

    out = conv.convert(ckpt, sd21, tmp_path / "vidrd", allow_unsafe_pickle=True)
    assert (out / "video_unet" / "config.json").is_file()


def test_not_a_vidrd_checkpoint(tmp_path, sd21):
    ckpt = tmp_path / "other.pth"
    torch.save({"state_dict": {"model.diffusion_model.conv.weight": torch.zeros(1)}}, ckpt)
    with pytest.raises(conv.ConversionError, match="no `unet.\\*` tensors"):
        conv.convert(ckpt, sd21, tmp_path / "vidrd")


def test_existing_output_needs_overwrite(tmp_path, sd21, unet_weights):
    ckpt = _lightning_checkpoint(tmp_path / "ModelT2V.pth", unet_weights)
    out = tmp_path / "vidrd"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(conv.ConversionError, match="--overwrite"):
        conv.convert(ckpt, sd21, out)
    assert (out / "keep.txt").is_file()
    conv.convert(ckpt, sd21, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "video_unet").is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_command_line(tmp_path, sd21, unet_weights, capsys):
    ckpt = _lightning_checkpoint(tmp_path / "ModelT2V.pth", unet_weights)
    args = ["--checkpoint", str(ckpt), "--sd21", str(sd21), "--output", str(tmp_path / "vidrd")]
    assert conv.main([*args, "--verify", "--device", "cpu", "--dtype", "fp32"]) == 0
    assert (tmp_path / "vidrd" / "video_unet").is_dir()
    assert conv.main(args) == 1
    assert "error:" in capsys.readouterr().err


def test_sd21_unet_config_gives_the_released_vidrd_layout():
    config = conv.unet_config_from_sd21(SD21_BASE_UNET_CONFIG)
    assert config["attention_head_dim"] == (5, 10, 20, 20)
    assert config["sample_size"] == 32
    with torch.device("meta"):
        unet = VidRDUNet3DConditionModel.from_config(config)
    shapes = {k: list(v.shape) for k, v in unet.state_dict().items()}
    assert shapes == json.loads(KEY_MANIFEST.read_text())["tensors"]


def test_sd_configs_with_features_vidrd_lacks_are_rejected():
    with pytest.raises(conv.ConversionError, match="class_embed_type"):
        conv.unet_config_from_sd21({**SD21_BASE_UNET_CONFIG, "class_embed_type": "timestep"})
    with pytest.raises(conv.ConversionError, match="block type"):
        conv.unet_config_from_sd21({**SD21_BASE_UNET_CONFIG, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4})
