"""VidRDUNet3DConditionModel: parameter layout, numerical parity with VidRD's own UNet, and behaviour."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from script_helpers import load_script

from bivdiff.models import VidRDUNet3DConditionModel

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
KEY_MANIFEST = ROOT / "tests" / "fixtures" / "vidrd_unet_keys_sd21.json"


@pytest.fixture(scope="module")
def parity():
    meta = json.loads((FIXTURES / "vidrd_parity.json").read_text())
    tensors = load_file(FIXTURES / "vidrd_parity.safetensors")
    # int8 * 2**exponent + offset is exact in float32, so these are bit-for-bit the weights the outputs came from.
    state_dict = {
        name: tensors[f"weight.{name}"].float() * 2.0**exponent + offset
        for name, (exponent, offset) in meta["weights"].items()
    }
    return meta, tensors, state_dict


@pytest.fixture(scope="module")
def parity_unet(parity):
    meta, _, state_dict = parity
    return load_script("convert_vidrd_to_diffusers").build_unet(meta["config"], state_dict)


def _timestep(value):
    return value if isinstance(value, int) else torch.tensor(value)


def _tiny_config(**overrides):
    config = dict(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=(2, 4),
    )
    config.update(overrides)
    return config


def test_full_size_parameters_match_vidrd_checkpoint_layout():
    manifest = json.loads(KEY_MANIFEST.read_text())
    with torch.device("meta"):
        unet = VidRDUNet3DConditionModel(**manifest["config"])
    ours = [(name, list(t.shape)) for name, t in unet.state_dict().items()]
    assert ours == list(manifest["tensors"].items())


def test_defaults_describe_released_vidrd():
    manifest = json.loads(KEY_MANIFEST.read_text())
    with torch.device("meta"):
        unet = VidRDUNet3DConditionModel()
    assert len(unet.state_dict()) == 1150
    assert {k: list(v.shape) for k, v in unet.state_dict().items()} == manifest["tensors"]


@pytest.mark.parametrize("case", ["f1", "f4", "f6", "f3_odd_size"])
def test_matches_original_vidrd_unet(parity, parity_unet, case):
    meta, tensors, _ = parity
    with torch.no_grad():
        out = parity_unet(
            tensors[f"{case}.sample"],
            _timestep(meta["cases"][case]["timestep"]),
            tensors[f"{case}.encoder_hidden_states"],
        ).sample
    expected = tensors[f"{case}.output"]
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= 1e-4


def test_single_frame_skips_temporal_layers_but_keeps_frame_position_embedding(parity, parity_unet):
    meta, tensors, state_dict = parity
    sample, text = tensors["f1.sample"], tensors["f1.encoder_hidden_states"]
    with torch.no_grad():
        reference = parity_unet(sample, 500, text).sample

        perturbed = VidRDUNet3DConditionModel(**meta["config"])
        perturbed.load_state_dict(
            {
                k: v + 0.5 if ("temp_convs" in k or "temp_attn" in k or "temp_norm" in k) else v
                for k, v in state_dict.items()
            }
        )
        assert torch.equal(perturbed(sample, 500, text).sample, reference)

        # Frame 0's embedding is (0, 1, 0, 1, ...), not zero: without it a single frame comes out differently.
        no_embedding = VidRDUNet3DConditionModel(**{**meta["config"], "add_temp_embed": False})
        no_embedding.load_state_dict(state_dict)
        assert (no_embedding(sample, 500, text).sample - reference).abs().max() > 1e-2


def test_starts_in_eval_mode_and_reloads_in_eval_mode(tmp_path):
    unet = VidRDUNet3DConditionModel(**_tiny_config())
    assert not unet.training
    assert not VidRDUNet3DConditionModel.from_config(unet.config).training
    unet.train()
    unet.save_pretrained(tmp_path)
    reloaded = VidRDUNet3DConditionModel.from_pretrained(tmp_path)
    assert not reloaded.training
    assert not any(m.training for m in reloaded.modules())


def _spatial_twin(unet: VidRDUNet3DConditionModel):
    """A frame-wise SD UNet2DConditionModel holding the video UNet's spatial weights."""
    from diffusers import UNet2DConditionModel

    cfg = unet.config
    twin = UNet2DConditionModel(
        sample_size=cfg.sample_size,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=[t.replace("3D", "2D") for t in cfg.down_block_types],
        up_block_types=[t.replace("3D", "2D") for t in cfg.up_block_types],
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        use_linear_projection=cfg.use_linear_projection,
        norm_num_groups=cfg.norm_num_groups,
        norm_eps=cfg.norm_eps,
    ).eval()
    video_weights = unet.state_dict()
    assert set(twin.state_dict()) <= set(video_weights)
    assert all("temp_" in k for k in set(video_weights) - set(twin.state_dict()))
    twin.load_state_dict({k: video_weights[k] for k in twin.state_dict()})
    return twin


def test_identical_frames_with_idle_temporal_layers_equal_framewise_sd_unet():
    # Freshly built, temporal convs and attention contribute zero; without the position embedding and with identical
    # frames the joint-frame GroupNorm sees the same statistics as a per-frame one, so SD's UNet must be reproduced.
    torch.manual_seed(0)
    unet = VidRDUNet3DConditionModel(**_tiny_config(add_temp_embed=False))
    twin = _spatial_twin(unet)
    frame = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = twin(frame, 300, text).sample
        video = unet(frame[:, :, None].expand(-1, -1, 3, -1, -1), 300, text).sample
        for f in range(3):
            assert (video[:, :, f] - expected).abs().max() < 1e-5

        # Different frames share GroupNorm statistics in the video UNet, so it departs from SD frame by frame...
        frames = torch.randn(1, 4, 3, 8, 8)
        joint = unet(frames, 300, text[:1]).sample
        per_frame = torch.stack([twin(frames[:, :, f], 300, text[:1]).sample for f in range(3)], dim=2)
        assert (joint - per_frame).abs().max() > 1e-3
        # ...but run one frame at a time it is SD again.
        single = torch.cat([unet(frames[:, :, f : f + 1], 300, text[:1]).sample for f in range(3)], dim=2)
        assert (single - per_frame).abs().max() < 1e-5


def test_freeu_is_diffusers_freeu_on_the_framewise_sd_unet():
    # Oracle: diffusers' own FreeU on the spatial twin. With idle temporal layers and identical frames the video UNet
    # is that UNet frame by frame (the test above), so with FreeU on in both they must agree again. The two stages
    # get different factors, so a block given the other's also fails.
    torch.manual_seed(0)
    unet = VidRDUNet3DConditionModel(**_tiny_config(add_temp_embed=False))
    twin = _spatial_twin(unet)
    frame, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    video = frame[:, :, None].expand(-1, -1, 3, -1, -1)
    freeu = dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with torch.no_grad():
        plain = unet(video, 300, text).sample
        unet.enable_freeu(**freeu)
        twin.enable_freeu(**freeu)
        expected = twin(frame, 300, text).sample
        with_freeu = unet(video, 300, text).sample
        for f in range(3):
            assert (with_freeu[:, :, f] - expected).abs().max() < 1e-5
        assert (with_freeu - plain).abs().max() > 1e-2
        unet.disable_freeu()
        assert torch.equal(unet(video, 300, text).sample, plain)


def test_additional_residuals_accept_video_and_folded_layouts(parity_unet, parity):
    _, tensors, _ = parity
    sample, text = tensors["f4.sample"], tensors["f4.encoder_hidden_states"]
    with torch.no_grad():
        down = parity_unet.down_blocks
        shapes = [(2, 32, 4, 8, 8), (2, 32, 4, 8, 8), (2, 32, 4, 4, 4), (2, 32, 4, 4, 4)]
        assert len(shapes) == 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in down)
        g = torch.Generator().manual_seed(0)
        residuals = [torch.randn(s, generator=g) for s in shapes]
        mid = torch.randn(2, 32, 4, 4, 4, generator=g)

        def folded(x):
            return x.permute(0, 2, 1, 3, 4).reshape(-1, *x.shape[1:2], *x.shape[3:])

        video = parity_unet(
            sample, 10, text, down_block_additional_residuals=residuals, mid_block_additional_residual=mid
        )
        flat = parity_unet(
            sample,
            10,
            text,
            down_block_additional_residuals=[folded(r) for r in residuals],
            mid_block_additional_residual=folded(mid),
        )
        plain = parity_unet(sample, 10, text).sample
    assert torch.equal(video.sample, flat.sample)
    assert (video.sample - plain).abs().max() > 1e-3


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    unet = VidRDUNet3DConditionModel(**_tiny_config())
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    sample, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)

    def grads():
        unet.zero_grad()
        unet(sample, 10, text).sample.square().mean().backward()
        return [p.grad.clone() for p in unet.parameters()]

    plain = grads()
    unet.enable_gradient_checkpointing()
    assert unet.is_gradient_checkpointing
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True))


def test_half_precision_forward(parity, parity_unet):
    meta, tensors, state_dict = parity
    unet = VidRDUNet3DConditionModel(**meta["config"])
    unet.load_state_dict(state_dict)
    unet = unet.to(torch.float16)
    with torch.no_grad():
        out = unet(tensors["f4.sample"], torch.tensor([999, 10]), tensors["f4.encoder_hidden_states"]).sample
    assert out.dtype == torch.float16
    assert (out.float() - tensors["f4.output"]).abs().max() < 2e-2


def test_return_tuple_and_scalar_timesteps(parity_unet, parity):
    _, tensors, _ = parity
    sample, text = tensors["f4.sample"], tensors["f4.encoder_hidden_states"]
    with torch.no_grad():
        as_int = parity_unet(sample, 10, text, return_dict=False)[0]
        as_tensor = parity_unet(sample, torch.tensor(10), text).sample
        as_float = parity_unet(sample, 10.0, text).sample
    assert torch.equal(as_int, as_tensor)
    assert torch.allclose(as_int, as_float)


def test_rejects_widths_the_temporal_groupnorm_cannot_split():
    with pytest.raises(ValueError, match="multiples of 32"):
        VidRDUNet3DConditionModel(**_tiny_config(block_out_channels=(32, 48)))
