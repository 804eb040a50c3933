"""IP-Adapter image prompts on the pipelines whose stage 1 is a stock pipeline that takes them (ControlNet,
InstructPix2Pix, SD Inpainting). Oracles: the stock pipeline frame by frame, the pipeline without the adapter (an
adapter at scale 0 and an unloaded one change nothing), the same call given the embeddings instead of the image,
a direct UNet call with diffusers' own image embedding, and, for an AnimateDiff UNet running the adapted layers,
diffusers' own `from_unet2d` copy of them."""

import inspect
import types

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    UNetMotionModel,
)
from pipeline_helpers import all_models, bivdiff_components, control_video, count_forward_calls, generators, stage1
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from bivdiff import (
    BIVDiffControllablePipeline,
    BIVDiffInpaintPipeline,
    BIVDiffInstructPix2PixPipeline,
    BIVDiffPipeline,
    BIVDiffPrompt2PromptPipeline,
    motion_unet_sharing_weights,
)
from bivdiff.tiny_models import tiny_adapter, tiny_controlnet, tiny_motion_adapter, tiny_unet

IMAGE_EMBED_DIM = 12
NUM_FRAMES = 3


def tiny_image_encoder() -> CLIPVisionModelWithProjection:
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=IMAGE_EMBED_DIM)
    return CLIPVisionModelWithProjection(config).eval()


def image_side() -> dict:
    return dict(image_encoder=tiny_image_encoder(), feature_extractor=CLIPImageProcessor(size=32, crop_size=32))


def ip_adapter_weights(unet, seed: int = 1) -> dict:
    """Random IP-Adapter weights for `unet` in the released checkpoints' layout: `image_proj` (four image tokens), and
    `ip_adapter` numbered 1, 3, 5, ... over the cross-attention layers in `attn_processors` order."""
    generator = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim
    layers = {}
    cross = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for index, name in enumerate(cross):
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape[0]
        for weight in ("to_k_ip", "to_v_ip"):
            layers[f"{2 * index + 1}.{weight}.weight"] = 0.3 * torch.randn(hidden, width, generator=generator)
    image_proj = {"proj.weight": 0.3 * torch.randn(4 * width, IMAGE_EMBED_DIM, generator=generator),
                  "proj.bias": torch.zeros(4 * width), "norm.weight": torch.ones(width),
                  "norm.bias": torch.zeros(width)}
    return {"image_proj": image_proj, "ip_adapter": layers}


def load_tiny_ip_adapter(pipe):
    pipe.load_ip_adapter(ip_adapter_weights(pipe.unet), subfolder="", weight_name="", image_encoder_folder=None)


def reference_image() -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def masks() -> np.ndarray:
    values = np.zeros((NUM_FRAMES, 32, 32), dtype=np.float32)
    values[:, 8:24, 8:24] = 1.0
    return values


# name -> (pipeline factory, call inputs, stock stage-1 class, its own components, its inputs for frame i)
CASES = {
    "controllable": (
        lambda **c: BIVDiffControllablePipeline(**bivdiff_components(**{"controlnet": tiny_controlnet(), **c})),
        dict(prompt="a red car", conditioning_frames=control_video()),
        StableDiffusionControlNetPipeline,
        ("controlnet",),
        lambda i: {"image": control_video()[i : i + 1]},
    ),
    "instruct_pix2pix": (
        lambda **c: BIVDiffInstructPix2PixPipeline(
            **bivdiff_components(unet=tiny_unet(8), inversion_unet=tiny_unet(seed=1), **c)
        ),
        dict(video=control_video(), prompt="make it red", video_prompt="a red car"),
        StableDiffusionInstructPix2PixPipeline,
        (),
        lambda i: {"image": control_video()[i : i + 1], "image_guidance_scale": 1.5},
    ),
    "inpaint": (
        lambda **c: BIVDiffInpaintPipeline(
            **bivdiff_components(unet=tiny_unet(9), inversion_unet=tiny_unet(seed=1), **c)
        ),
        dict(video=control_video(), mask=masks(), prompt="a cat"),
        StableDiffusionInpaintPipeline,
        (),
        lambda i: {"image": control_video()[i : i + 1], "mask_image": masks()[i : i + 1]},
    ),
}


def make_pipe(name, ip_adapter: bool = True, **components):
    pipe = CASES[name][0](**{**image_side(), **components})
    pipe.set_progress_bar_config(disable=True)
    if ip_adapter:
        load_tiny_ip_adapter(pipe)
    return pipe


def inputs(name, **overrides):
    args = dict(CASES[name][1], num_inference_steps=2, mixing_ratio=0.5, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    return {**args, **overrides}


def stock_pipeline(name, pipe):
    """The stock stage-1 pipeline of case `name` on `pipe`'s own models."""
    _, _, stock_class, own, _ = CASES[name]
    parts = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "image_encoder", "feature_extractor", *own)
    stock = stock_class(**{k: getattr(pipe, k) for k in parts}, safety_checker=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    return stock


@pytest.fixture(params=list(CASES))
def name(request):
    return request.param


@torch.no_grad()
def test_stage1_with_an_image_prompt_equals_the_stock_pipeline_per_frame(name):
    pipe = make_pipe(name)
    _, args, _, _, frame_inputs = CASES[name]
    ours = stage1(pipe, **args, ip_adapter_image=reference_image(), negative_prompt="ugly", num_inference_steps=3,
                  frame_batch_size=2, generator=generators())
    stock = stock_pipeline(name, pipe)
    for i in range(NUM_FRAMES):
        expected = stock(args["prompt"], negative_prompt="ugly", ip_adapter_image=reference_image(),
                         num_inference_steps=3, generator=torch.Generator().manual_seed(i), output_type="latent",
                         **frame_inputs(i)).images
        torch.testing.assert_close(ours[0, :, i], expected[0], atol=1e-4, rtol=0)


@torch.no_grad()
def test_an_adapter_at_scale_zero_or_unloaded_gives_the_video_without_it(name):
    pipe = make_pipe(name, ip_adapter=False)
    without = pipe(**inputs(name)).frames
    load_tiny_ip_adapter(pipe)
    with_image = pipe(**inputs(name, ip_adapter_image=reference_image())).frames
    assert not torch.allclose(with_image, without, atol=1e-3)
    pipe.set_ip_adapter_scale(0.0)
    torch.testing.assert_close(pipe(**inputs(name, ip_adapter_image=reference_image())).frames, without)
    pipe.unload_ip_adapter()
    torch.testing.assert_close(pipe(**inputs(name)).frames, without)


@torch.no_grad()
@pytest.mark.parametrize("name", ["controllable", "inpaint"])
def test_embeddings_give_the_video_of_their_image(name):
    """`ip_adapter_image_embeds` as diffusers' stock pipeline prepares them for its own call. (Its InstructPix2Pix
    pipeline reads an image prompt only as an image, so BIVDiff's takes no embeddings.)"""
    pipe = make_pipe(name)
    stock = stock_pipeline(name, pipe)
    embeds = stock.prepare_ip_adapter_image_embeds(reference_image(), None, torch.device("cpu"), 1, True)
    from_image = pipe(**inputs(name, ip_adapter_image=reference_image())).frames
    torch.testing.assert_close(pipe(**inputs(name, ip_adapter_image_embeds=embeds)).frames, from_image)


@torch.no_grad()
def test_the_image_prompt_is_encoded_once_per_call_whatever_the_frame_batches():
    pipe = make_pipe("controllable")
    with count_forward_calls(image_encoder=pipe.image_encoder) as calls:
        pipe(**inputs("controllable", ip_adapter_image=reference_image(), frame_batch_size=1))
    assert calls == {"image_encoder": 1}  # one image embedding; its negative is zeros, as in diffusers


@torch.no_grad()
def test_the_image_inversion_conditions_the_adapted_unet_on_the_image_prompt():
    """Oracle: a direct UNet call with the embedding diffusers' `encode_image` gives (the conditional one)."""
    pipe = make_pipe("controllable")
    stock = stock_pipeline("controllable", pipe)
    call = types.SimpleNamespace(ip_adapter_image=reference_image(), ip_adapter_image_embeds=None, guidance_scale=7.5)
    pipe.begin_call()
    pipe.prepare_image_prompt(stock, call)
    latents, text = torch.randn(NUM_FRAMES, 4, 16, 16), torch.randn(1, 77, 32)
    ours = pipe.image_inversion_noise(latents, 501, text, frame_batch_size=2, pooled=False)
    image = stock.encode_image(reference_image(), torch.device("cpu"), 1)[0][None]  # (1, 1 image, D)
    expected = pipe.unet(latents, 501, encoder_hidden_states=text.expand(NUM_FRAMES, -1, -1),
                         added_cond_kwargs={"image_embeds": [image.expand(NUM_FRAMES, -1, -1)]}).sample
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def animatediff_sharing_the_unet() -> dict:
    unet, components = tiny_unet(), bivdiff_components()
    return dict(unet=unet, video_unet=motion_unet_sharing_weights(unet, tiny_motion_adapter()),
                video_text_encoder=components["text_encoder"], video_tokenizer=components["tokenizer"])


def animatediff_with_its_own_adapters(count: int) -> dict:
    """An AnimateDiff UNet on its own copy of an SD-1.5 UNet, carrying `count` IP-Adapters of its own."""
    video_unet = UNetMotionModel.from_unet2d(tiny_unet(), tiny_motion_adapter())
    video_unet._load_ip_adapter_weights([ip_adapter_weights(tiny_unet())] * count)
    image = bivdiff_components()
    return dict(video_unet=video_unet, video_text_encoder=image["text_encoder"], video_tokenizer=image["tokenizer"])


# case -> (the pipeline's components, the call's image prompt, the message)
REFUSALS = {
    "no adapter": (dict, lambda: dict(ip_adapter_image=reference_image()),
                   "needs an IP-Adapter in `unet`"),
    "no image": (dict, dict, "needs its image prompt"),
    "both": (dict, lambda: dict(ip_adapter_image=reference_image(), ip_adapter_image_embeds=[torch.zeros(2, 1, 12)]),
             "not both"),
    "two images, one adapter": (dict, lambda: dict(ip_adapter_image=[reference_image()] * 2), "one image"),
    "embeds not a list": (dict, lambda: dict(ip_adapter_image_embeds=torch.zeros(2, 1, 12)), "list of 3-D or 4-D"),
    "no image encoder": (lambda: dict(image_encoder=None), lambda: dict(ip_adapter_image=reference_image()),
                         "needs `image_encoder`"),
    "T2I-Adapter": (lambda: dict(controlnet=None, adapter=tiny_adapter()),
                    lambda: dict(ip_adapter_image=reference_image()), "with `controlnet` only"),
    "a video UNet with two adapters": (lambda: animatediff_with_its_own_adapters(2),
                                       lambda: dict(ip_adapter_image=reference_image()), "`video_unet` 2"),
    "unguided embeddings, guided video model": (
        animatediff_sharing_the_unet,
        lambda: dict(ip_adapter_image_embeds=[torch.zeros(1, 1, 12)], guidance_scale=1.0, video_guidance_scale=7.5),
        "negative image-prompt embeddings",
    ),
    # The adapter loaded into `unet` by another pipeline holding it, so the video UNet did not get the projection.
    "a shared AnimateDiff UNet without the projection": (
        animatediff_sharing_the_unet, lambda: dict(ip_adapter_image=reference_image()), "no image projection"
    ),
    "InstructPix2Pix, its video UNet carrying an adapter": (
        lambda: animatediff_with_its_own_adapters(1), lambda: dict(ip_adapter_image=reference_image()),
        "none is left for the video model",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_mismatched_image_prompt_is_refused_before_any_model_runs(case):
    pipe_keywords, image_prompt, message = REFUSALS[case]
    name = "instruct_pix2pix" if case.startswith("InstructPix2Pix") else "controllable"
    pipe = CASES[name][0](**{**image_side(), **pipe_keywords()})
    pipe.set_progress_bar_config(disable=True)
    if case == "a shared AnimateDiff UNet without the projection":
        load_tiny_ip_adapter(stock_pipeline(name, pipe))
    elif case != "no adapter":
        load_tiny_ip_adapter(pipe)
    with count_forward_calls(**all_models(pipe)) as calls, pytest.raises(ValueError, match=message):
        pipe(**inputs(name, **image_prompt()))
    assert not any(calls.values())


def test_load_ip_adapter_fetches_its_image_encoder_into_the_pipeline_which_saves_and_loads_it(tmp_path):
    """diffusers' loader on a folder laid out as h94/IP-Adapter: the weights beside an `image_encoder` folder."""
    pipe = make_pipe("controllable", ip_adapter=False, image_encoder=None, feature_extractor=None)
    save_file({f"{group}.{key}": value.contiguous() for group, weights in ip_adapter_weights(pipe.unet).items()
               for key, value in weights.items()}, tmp_path / "ip-adapter.safetensors")
    tiny_image_encoder().save_pretrained(tmp_path / "image_encoder")
    pipe.load_ip_adapter(tmp_path, subfolder="", weight_name="ip-adapter.safetensors")
    assert isinstance(pipe.image_encoder, CLIPVisionModelWithProjection)
    assert pipe.feature_extractor.crop_size == {"height": 32, "width": 32}  # the encoder's input size
    with torch.no_grad():
        video = pipe(**inputs("controllable", ip_adapter_image=reference_image())).frames

    pipe.unload_ip_adapter()
    loaded_encoder = make_pipe("controllable", ip_adapter=False)
    loaded_encoder.save_pretrained(tmp_path / "pipe")
    restored = BIVDiffControllablePipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    for key in ("image_encoder", "feature_extractor"):
        assert type(restored.components[key]) is type(loaded_encoder.components[key])
    torch.testing.assert_close(restored.image_encoder.state_dict(), loaded_encoder.image_encoder.state_dict())
    assert video.shape == (1, 4, NUM_FRAMES, 16, 16)


def test_pipelines_whose_stage_1_takes_no_image_prompt_offer_no_ip_adapter():
    """Prompt2Prompt's attention editing replaces the attention processors an adapter needs; BIVDiffPipeline has no
    image model stage."""
    for pipeline_class in (BIVDiffPrompt2PromptPipeline, BIVDiffPipeline):
        assert "ip_adapter_image" not in inspect.signature(pipeline_class.__call__).parameters
        assert not hasattr(pipeline_class, "load_ip_adapter")
    for pipeline_class in (BIVDiffControllablePipeline, BIVDiffInstructPix2PixPipeline, BIVDiffInpaintPipeline):
        assert "ip_adapter_image" in inspect.signature(pipeline_class.__call__).parameters
        assert {"image_encoder", "feature_extractor"} <= set(pipeline_class._optional_components)
    with pytest.raises(TypeError, match="ip_adapter_image_embeds"):
        make_pipe("instruct_pix2pix")(**inputs("instruct_pix2pix", ip_adapter_image_embeds=[torch.zeros(3, 1, 12)]))


@torch.no_grad()
def test_from_pipe_carries_a_stock_pipelines_ip_adapter_over():
    """A stock ControlNet pipeline with an IP-Adapter loaded becomes a BIVDiff one holding the very same models."""
    from bivdiff.tiny_models import tiny_image_components, tiny_video_components

    image = {k: v for k, v in tiny_image_components().items() if k != "inverse_scheduler"}
    stock = StableDiffusionControlNetPipeline(**image, controlnet=tiny_controlnet(), safety_checker=None,
                                              requires_safety_checker=False, **image_side())
    load_tiny_ip_adapter(stock)
    pipe = BIVDiffControllablePipeline.from_pipe(stock, **tiny_video_components())
    pipe.set_progress_bar_config(disable=True)
    for key in ("unet", "image_encoder", "feature_extractor", "controlnet"):
        assert getattr(pipe, key) is getattr(stock, key)
    with_image = pipe(**inputs("controllable", ip_adapter_image=reference_image())).frames
    pipe.set_ip_adapter_scale(0.0)
    assert not torch.allclose(pipe(**inputs("controllable", ip_adapter_image=reference_image())).frames, with_image)


def video_models() -> dict:
    from bivdiff.tiny_models import tiny_modelscope_unet, tiny_video_components, tiny_vidrd_unet

    image = bivdiff_components()
    return {
        "zeroscope": tiny_video_components(),
        "modelscope": tiny_video_components(video_unet=tiny_modelscope_unet()),
        "vidrd": tiny_video_components(video_unet=tiny_vidrd_unet()),
        # AnimateDiff on its own copy of an SD-1.5 UNet (not sharing `unet`'s layers), with SD's text side.
        "animatediff": dict(video_unet=UNetMotionModel.from_unet2d(tiny_unet(), tiny_motion_adapter()),
                            video_text_encoder=image["text_encoder"], video_tokenizer=image["tokenizer"]),
        # AnimateDiff running `unet`'s own layers, and so its adapter too.
        "animatediff sharing the unet": animatediff_sharing_the_unet(),
    }


@torch.no_grad()
@pytest.mark.parametrize("video_model", ["zeroscope", "modelscope", "vidrd", "animatediff",
                                         "animatediff sharing the unet"])
def test_every_video_model_smooths_frames_made_with_an_image_prompt(video_model):
    """Oracle: the adapter at scale 0 gives the video without it, whatever video model smooths."""
    pipe = make_pipe("controllable", ip_adapter=False, **video_models()[video_model])
    without = pipe(**inputs("controllable")).frames
    load_tiny_ip_adapter(pipe)
    pipe.set_ip_adapter_scale(0.0)
    torch.testing.assert_close(pipe(**inputs("controllable", ip_adapter_image=reference_image())).frames, without)


def prepared_image_prompt(pipe):
    """`pipe` as after stage 1 of a guided call with the reference image prompt; the stock pipeline that encoded it."""
    stock = stock_pipeline("controllable", pipe)
    call = types.SimpleNamespace(ip_adapter_image=reference_image(), ip_adapter_image_embeds=None, guidance_scale=7.5)
    pipe.begin_call()
    pipe.prepare_image_prompt(stock, call)
    return stock


@torch.no_grad()
def test_an_animatediff_unet_sharing_the_adapted_unet_smooths_and_inverts_with_the_image_prompt():
    """Oracle: diffusers' own AnimateDiff UNet with the adapter (`from_unet2d` of the adapted UNet: every weight
    copied), called in a DDIM loop with guidance on the embeddings the stock pipeline prepares, [negative, positive]
    for each of two videos; the inversion on the conditional ones."""
    pipe = make_pipe("controllable", **animatediff_sharing_the_unet())
    stock = prepared_image_prompt(pipe)
    oracle = UNetMotionModel.from_unet2d(pipe.unet, tiny_motion_adapter())
    negative_image, image = stock.prepare_ip_adapter_image_embeds(reference_image(), None, "cpu", 1, True)[0].chunk(2)
    latents = torch.randn(2, 4, NUM_FRAMES, 16, 16, generator=torch.Generator().manual_seed(3))
    text, negative = torch.randn(2, 77, 32), torch.randn(2, 77, 32)

    def eps(z, t, text_embeds, image_embeds):
        return oracle(z, t, encoder_hidden_states=text_embeds.repeat_interleave(NUM_FRAMES, 0),
                      added_cond_kwargs={"image_embeds": [image_embeds]}).sample

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(3)
    z, image_rows = latents, torch.cat([negative_image.expand(2, -1, -1), image.expand(2, -1, -1)])
    for t in scheduler.timesteps:
        noise_negative, noise_text = eps(torch.cat([z, z]), t, torch.cat([negative, text]), image_rows).chunk(2)
        z = scheduler.step(noise_negative + 7.5 * (noise_text - noise_negative), t, z).prev_sample
    torch.testing.assert_close(pipe.temporal_smoothing(latents, text, negative, 3, 7.5), z, atol=1e-4, rtol=0)

    alphas, z = pipe.scheduler.alphas_cumprod, latents
    for t in (1, 334, 667):  # the original's reverse step over 3 steps: next level t + 333, the last 998
        a_t, a_next = alphas[t], alphas[min(t + 333, 998)]
        x0 = (z - (1 - a_t).sqrt() * (e := eps(z, t, negative, image.expand(2, -1, -1)))) / a_t.sqrt()
        z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * e
    torch.testing.assert_close(pipe.invert_video_branch(latents, negative, 3), z, atol=1e-4, rtol=0)


@torch.no_grad()
def test_loading_and_unloading_through_the_pipeline_keeps_a_shared_animatediff_unet_in_step():
    """Oracles: the same models with diffusers' `from_unet2d` copy of the adapted UNet as the video UNet, and, once
    the adapter is unloaded, the pipeline before it was loaded."""
    pipe = make_pipe("controllable", ip_adapter=False, **animatediff_sharing_the_unet())
    without = pipe(**inputs("controllable")).frames
    load_tiny_ip_adapter(pipe)
    assert pipe.video_unet.encoder_hid_proj is pipe.unet.encoder_hid_proj
    shared = pipe(**inputs("controllable", ip_adapter_image=reference_image())).frames
    copied_unet = UNetMotionModel.from_unet2d(pipe.unet, tiny_motion_adapter())
    copied = BIVDiffControllablePipeline(**{**pipe.components, "video_unet": copied_unet})
    copied.set_progress_bar_config(disable=True)
    torch.testing.assert_close(copied(**inputs("controllable", ip_adapter_image=reference_image())).frames, shared)
    assert not torch.allclose(shared, without, atol=1e-3)
    pipe.unload_ip_adapter()
    torch.testing.assert_close(pipe(**inputs("controllable")).frames, without)


@torch.no_grad()
def test_an_unguided_stage_1_still_gives_a_guided_animatediff_unet_the_negative_image_prompt():
    """Stage 1 at guidance 1 equals the stock pipeline frame by frame, while the AnimateDiff UNet running the adapted
    layers, guided, gets the [negative, positive] embeddings the stock pipeline prepares under guidance."""
    pipe = make_pipe("controllable", **animatediff_sharing_the_unet())
    args = dict(prompt="a red car", ip_adapter_image=reference_image(), guidance_scale=1.0)
    ours = stage1(pipe, **args, conditioning_frames=control_video(), video_guidance_scale=7.5, num_inference_steps=2,
                  generator=generators())
    stock = stock_pipeline("controllable", pipe)
    for i in range(NUM_FRAMES):
        expected = stock(**args, num_inference_steps=2, generator=torch.Generator().manual_seed(i),
                         output_type="latent", **CASES["controllable"][4](i)).images
        torch.testing.assert_close(ours[0, :, i], expected[0], atol=1e-4, rtol=0)
    guided = stock.prepare_ip_adapter_image_embeds(reference_image(), None, "cpu", 1, True)
    torch.testing.assert_close(pipe.video_image_prompt(1, guided=True), guided)


@torch.no_grad()
def test_unguided_embeddings_give_an_unguided_animatediff_unet_the_video_of_their_image():
    """Without guidance anywhere the embeddings hold no negative half; oracle: the same call given the image."""
    pipe = make_pipe("controllable", **animatediff_sharing_the_unet())
    unguided = dict(guidance_scale=1.0, video_guidance_scale=1.0)
    embeds = stock_pipeline("controllable", pipe).prepare_ip_adapter_image_embeds(reference_image(), None, "cpu", 1,
                                                                                  False)
    from_image = pipe(**inputs("controllable", ip_adapter_image=reference_image(), **unguided)).frames
    torch.testing.assert_close(pipe(**inputs("controllable", ip_adapter_image_embeds=embeds, **unguided)).frames,
                               from_image)


@torch.no_grad()
def test_a_pipeline_saved_with_the_adapter_loaded_reloads_without_it_as_diffusers_own_do(tmp_path):
    """diffusers keeps a loaded adapter out of the saved configs, so a reloaded pipeline has none; the AnimateDiff UNet
    running the adapted layers follows `unet`. Oracle: the pipeline before the adapter was loaded."""
    pipe = make_pipe("controllable", ip_adapter=False, **animatediff_sharing_the_unet())
    without = pipe(**inputs("controllable")).frames
    load_tiny_ip_adapter(pipe)
    pipe.save_pretrained(tmp_path)
    restored = BIVDiffControllablePipeline.from_pretrained(tmp_path, local_files_only=True)
    restored.set_progress_bar_config(disable=True)
    torch.testing.assert_close(restored(**inputs("controllable")).frames, without)
