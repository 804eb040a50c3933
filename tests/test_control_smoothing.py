"""`control_smoothing=True`: the ControlNet also guides temporal smoothing by an AnimateDiff video UNet. Oracle:
diffusers' AnimateDiffControlNetPipeline denoising the same mixed noise with the same prompt embeddings."""

import pytest
import torch
from diffusers import AnimateDiffControlNetPipeline
from pipeline_helpers import HEIGHT, NUM_FRAMES, WIDTH, control_video
from video_model_helpers import video_model_components

from bivdiff import BIVDiffControllablePipeline
from bivdiff.tiny_models import tiny_controlnet

STEPS = 3


def animatediff_pipe(**overrides) -> BIVDiffControllablePipeline:
    components = video_model_components("animatediff", **{"controlnet": tiny_controlnet(), **overrides})
    pipe = BIVDiffControllablePipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, **overrides) -> torch.Tensor:
    arguments = dict(prompt="a bear walking", conditioning_frames=control_video(), mixing_ratio=0.5,
                     num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, output_type="latent",
                     generator=torch.Generator().manual_seed(0))
    return pipe(**{**arguments, **overrides}).frames


@pytest.mark.parametrize("nets", [1, 2], ids=["one ControlNet", "two ControlNets"])
def test_smoothing_is_animatediff_controlnets_denoising_of_the_mixed_noise(monkeypatch, nets):
    if nets == 1:
        pipe, videos, scale = animatediff_pipe(), control_video(), 0.7
    else:
        pipe = animatediff_pipe(controlnet=[tiny_controlnet(seed=1), tiny_controlnet(seed=2)])
        videos, scale = [control_video(seed=1), control_video(seed=2)], [0.7, 0.4]
    seen = {}
    smooth = pipe.temporal_smoothing

    def spy(latents, prompt_embeds, negative_prompt_embeds, *args, **kwargs):
        seen.update(latents=latents.clone(), prompt_embeds=prompt_embeds, negative_embeds=negative_prompt_embeds)
        return smooth(latents, prompt_embeds, negative_prompt_embeds, *args, **kwargs)

    monkeypatch.setattr(pipe, "temporal_smoothing", spy)
    controlled = call(pipe, conditioning_frames=videos, control_smoothing=True, controlnet_conditioning_scale=scale)

    stock = AnimateDiffControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.video_text_encoder, tokenizer=pipe.video_tokenizer, unet=pipe.video_unet,
        motion_adapter=None, controlnet=pipe.controlnet, scheduler=pipe.smoothing_scheduler(),
    )  # fmt: skip
    stock.set_progress_bar_config(disable=True)
    expected = stock(
        prompt_embeds=seen["prompt_embeds"], negative_prompt_embeds=seen["negative_embeds"],
        latents=seen["latents"], conditioning_frames=list(videos) if nets == 1 else [list(v) for v in videos],
        num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
        controlnet_conditioning_scale=scale, output_type="latent",
    ).frames  # fmt: skip
    torch.testing.assert_close(controlled, expected, rtol=1e-5, atol=1e-5)
    # Without the switch, smoothing is the video model's alone, and the ControlNet's guidance shows.
    plain = call(pipe, conditioning_frames=videos, controlnet_conditioning_scale=scale)
    assert (controlled - plain).abs().max() > 1e-3


def test_a_video_window_reads_the_controlnet_residuals_of_its_own_frames():
    """The ControlNet sees one frame at a time, so a window's residuals are the clip's residuals of those frames."""
    pipe = animatediff_pipe()
    conditions = torch.rand(1, 3, NUM_FRAMES, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1))
    pipe._smoothing_control = ([conditions[0].transpose(0, 1)], 1.0)
    pipe.current_stage = "temporal smoothing"
    sample = torch.randn(2, 4, NUM_FRAMES, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(2))
    embeds = torch.randn(2, 77, pipe.video_text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(3))
    clip = pipe.video_unet_residuals(sample, 500, embeds, slice(0, NUM_FRAMES))
    window = pipe.video_unet_residuals(sample[:, :, 1:], 500, embeds, slice(1, NUM_FRAMES))

    def frames_of(residual, frames):  # (B * F, ...) with each video's frames together -> those frames
        return residual.unflatten(0, (2, -1))[:, frames].flatten(0, 1)

    for whole, part in zip(clip["down_block_additional_residuals"], window["down_block_additional_residuals"]):
        torch.testing.assert_close(part, frames_of(whole, slice(1, NUM_FRAMES)))
    torch.testing.assert_close(window["mid_block_additional_residual"],
                               frames_of(clip["mid_block_additional_residual"], slice(1, NUM_FRAMES)))
    # Outside smoothing (the video branch of the inversion), no residuals.
    pipe.current_stage = "video inversion"
    assert pipe.video_unet_residuals(sample, 500, embeds, slice(0, NUM_FRAMES)) == {}


@pytest.mark.parametrize(
    "video_model, overrides, message",
    [
        ("zeroscope", {}, "an AnimateDiff `video_unet`"),
        ("animatediff", {"guess_mode": True}, "takes no `guess_mode`"),
    ],
)
def test_control_smoothing_is_refused_where_it_cannot_work(video_model, overrides, message):
    pipe = BIVDiffControllablePipeline(**video_model_components(video_model, controlnet=tiny_controlnet()))
    with pytest.raises(ValueError, match=message):
        call(pipe, control_smoothing=True, **overrides)


def test_each_video_of_a_batch_is_smoothed_as_if_alone():
    """Every video of a batch reads the same condition frames: video 2 of a batch equals video 2 called alone."""
    pipe = animatediff_pipe()
    batch = call(pipe, prompt=["a bear walking", "a robot walking"], control_smoothing=True,
                 generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    alone = call(pipe, prompt="a robot walking", control_smoothing=True, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(batch[1], alone[0], rtol=1e-4, atol=1e-4)
