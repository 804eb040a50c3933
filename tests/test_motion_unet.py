"""AnimateDiff's UNet on the image UNet's own weights: one copy in memory, the outputs of diffusers' own build."""

import pytest
import torch
from diffusers import MotionAdapter, UNetMotionModel

from bivdiff.models import motion_unet_sharing_weights
from bivdiff.tiny_models import IMAGE_TEXT_DIM, tiny_motion_adapter, tiny_unet

NUM_FRAMES = 4


def storages(*modules: torch.nn.Module) -> dict[int, int]:
    """Bytes of each distinct tensor storage (keyed by its address) held by the modules' parameters and buffers."""
    found = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


def nbytes(*modules: torch.nn.Module) -> int:
    return sum(storages(*modules).values())


def inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, NUM_FRAMES, 8, 8, generator=g)
    # diffusers 0.42's UNetMotionModel reads the text embeddings already repeated per frame, (B * F, L, d).
    text = torch.randn(batch, 77, IMAGE_TEXT_DIM, generator=g).repeat_interleave(NUM_FRAMES, dim=0)
    return sample, torch.tensor(500), text


def run(model, *args):
    with torch.no_grad():
        return model(*args).sample


@pytest.fixture
def parts():
    unet, adapter = tiny_unet(), tiny_motion_adapter(seed=1)
    return unet, adapter, motion_unet_sharing_weights(unet, adapter)


def test_spatial_weights_are_held_once(parts):
    unet, adapter, shared = parts
    unshared = UNetMotionModel.from_unet2d(unet, adapter)

    assert nbytes(unet, shared) == nbytes(unet) + nbytes(adapter)
    assert set(storages(shared)) <= set(storages(unet)) | set(storages(adapter))
    # diffusers' own build holds a second copy of every spatial tensor.
    assert nbytes(unet, unshared) == 2 * nbytes(unet) + nbytes(adapter)
    assert shared.down_blocks[0].attentions is unet.down_blocks[0].attentions
    assert shared.up_blocks[-1].motion_modules is adapter.up_blocks[-1].motion_modules


def test_outputs_equal_diffusers_from_unet2d(parts):
    unet, adapter, shared = parts
    unshared = UNetMotionModel.from_unet2d(unet, adapter)
    assert shared.config == unshared.config
    args = inputs()
    out = run(shared, *args)
    assert out.shape == args[0].shape
    torch.testing.assert_close(out, run(unshared, *args), rtol=0, atol=0)


def test_motion_modules_make_frames_interact(parts):
    # A frame's output depends on the other frames only through the motion modules: the check that they run.
    _, _, shared = parts
    sample, t, text = inputs()
    changed = sample.clone()
    changed[:, :, 0] += 1
    diff = (run(shared, changed, t, text) - run(shared, sample, t, text))[:, :, 1:].abs().amax()
    assert diff > 1e-4


def test_edits_of_the_image_unet_reach_the_motion_unet(parts):
    unet, adapter, shared = parts
    args = inputs()
    before = run(shared, *args)
    with torch.no_grad():
        # What fusing a LoRA does: the base weight changes in place.
        attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
        attn.to_v.weight += 0.5 * torch.randn_like(attn.to_v.weight)
        # And loading other weights into the image UNet.
        unet.load_state_dict(tiny_unet(seed=3).state_dict(), strict=True)
    after = run(shared, *args)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, run(UNetMotionModel.from_unet2d(unet, adapter), *args), rtol=0, atol=0)


def test_save_and_load_give_a_complete_motion_unet(parts, tmp_path):
    _, _, shared = parts
    shared.save_pretrained(tmp_path)
    loaded = UNetMotionModel.from_pretrained(tmp_path)
    args = inputs()
    torch.testing.assert_close(run(loaded, *args), run(shared, *args), rtol=0, atol=0)


def test_text_embeddings_must_be_repeated_per_frame(parts):
    _, _, shared = parts
    sample, t, text = inputs()
    with pytest.raises(RuntimeError):
        run(shared, sample, t, text[::NUM_FRAMES])


def test_adapter_for_another_architecture_is_refused():
    wider = MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_norm_num_groups=2)
    with pytest.raises(ValueError, match="another UNet architecture"):
        motion_unet_sharing_weights(tiny_unet(), wider)


def motion_lora(model: UNetMotionModel, seed: int = 0) -> dict:
    """Random LoRA weights on the motion modules' attention projections, in diffusers' layout (`unet.` prefix, peft
    `lora_A` / `lora_B`), as an AnimateDiff motion LoRA (a camera move) reads once converted."""
    generator, weights = torch.Generator().manual_seed(seed), {}
    for name, module in model.named_modules():
        if "motion_modules" in name and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            weights[f"unet.{name}.lora_A.weight"] = 0.1 * torch.randn(2, module.in_features, generator=generator)
            weights[f"unet.{name}.lora_B.weight"] = 0.1 * torch.randn(module.out_features, 2, generator=generator)
    return weights


def test_a_motion_lora_loads_into_the_shared_unet_as_into_diffusers_animatediff(parts):
    """Oracle: diffusers' AnimateDiffPipeline loading the same motion LoRA into its `from_unet2d` UNet. The LoRA sits
    in the motion modules, so the image UNet, whose layers the motion UNet runs, is left as it was."""
    from diffusers import AnimateDiffPipeline

    from bivdiff.tiny_models import tiny_scheduler, tiny_text_encoder, tiny_tokenizer, tiny_vae

    unet, adapter, shared = parts
    stock = AnimateDiffPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(),
                                unet=UNetMotionModel.from_unet2d(unet, adapter), motion_adapter=adapter,
                                scheduler=tiny_scheduler())
    args, frame = inputs(), (torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(1, 77, IMAGE_TEXT_DIM))
    before, image_before = run(shared, *args), run(unet, *frame)
    shared.load_lora_adapter(motion_lora(shared), prefix="unet", adapter_name="zoom-in")
    stock.load_lora_weights(motion_lora(shared), adapter_name="zoom-in")
    after = run(shared, *args)
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, run(stock.unet, *args), rtol=0, atol=1e-6)
    torch.testing.assert_close(run(unet, *frame), image_before, rtol=0, atol=0)
    shared.set_adapters(["zoom-in"], [0.0])
    torch.testing.assert_close(run(shared, *args), before, rtol=0, atol=1e-6)
