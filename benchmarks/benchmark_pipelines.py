"""Benchmark BIVDiff's ControlNet pipeline: per-stage time, UNet evaluations and peak memory, and the speed-ups
of batching and of skipping unweighted inversion branches, each measured as a ratio within one run.

    python benchmarks/benchmark_pipelines.py                      # tiny random models, CPU, seconds
    python benchmarks/benchmark_pipelines.py --size full --device cuda --dtype fp16 --frames 8 --steps 50

`--size full` builds the real architectures (SD-1.5 UNet + ControlNet + VAE + CLIP-L, ZeroScope's UNet3D and
text encoder) with random weights, so it needs no download; the numbers measure compute, not picture quality.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bivdiff import BIVDiffControllablePipeline
from bivdiff import tiny_models as tiny
from bivdiff.pipelines.mixed_inversion import frame_batches
from bivdiff.profiling import NetworkCallCounter, stage_summary


def clip_text_encoder(hidden: int, layers: int, heads: int):
    """A CLIP text tower with random weights: 768/12/12 is SD-1.5's CLIP-L, 1024/23/16 the OpenCLIP-H tower of
    SD-2.x, ModelScope, ZeroScope and VidRD."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_act="quick_gelu" if hidden == 768 else "gelu",
    )
    return CLIPTextModel(config)


def full_size_image_components() -> dict:
    """SD-1.5 UNet + ControlNet + VAE + CLIP-L at their real architectures, random weights."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    return dict(
        vae=AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        ),
        text_encoder=clip_text_encoder(768, 12, 12),
        tokenizer=tiny.tiny_tokenizer(),
        unet=UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64),
        controlnet=ControlNetModel(cross_attention_dim=768, attention_head_dim=8),
        scheduler=tiny.tiny_scheduler(),
        inverse_scheduler=tiny.tiny_inverse_scheduler(),
    )


def full_size_components() -> dict:
    from diffusers import UNet3DConditionModel

    return dict(
        **full_size_image_components(),
        video_unet=UNet3DConditionModel(),  # its defaults are ModelScope/ZeroScope's architecture
        video_text_encoder=clip_text_encoder(1024, 23, 16),
        video_tokenizer=tiny.tiny_tokenizer(),
    )


def tiny_components() -> dict:
    return {**tiny.tiny_image_components(), **tiny.tiny_video_components(), "controlnet": tiny.tiny_controlnet()}


def print_stage_table(stage_log: list[dict], calls: dict[str, dict[str, int]], indent: str = "") -> None:
    """Seconds, CUDA peak memory and network calls of each stage of one call."""
    print(f"{indent}{'stage':<24}{'seconds':>10}{'peak MiB':>10}  model calls")
    for entry in stage_summary(stage_log, calls):
        peak = entry["peak_memory_bytes"]
        models = ", ".join(f"{m} {n}" for m, n in sorted(entry["network_calls"].items()))
        peak_text = f"{peak / 2**20:10.0f}" if peak is not None else f"{'-':>10}"
        print(f"{indent}{entry['stage']:<24}{entry['seconds'] or 0:10.3f}{peak_text}  {models}")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(pipe, device, **kwargs) -> tuple[float, dict[str, dict[str, int]]]:
    """Wall time of one call and its network calls per stage."""
    with NetworkCallCounter(pipe) as counter:
        synchronize(device)
        start = time.perf_counter()
        pipe(**kwargs)
        synchronize(device)
    return time.perf_counter() - start, counter.as_dict()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--resolution", type=int, default=None, help="square size in pixels (default 32 tiny, 512 full)"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    size = args.resolution or (32 if args.size == "tiny" else 512)
    torch.manual_seed(0)
    with torch.device(device):
        components = tiny_components() if args.size == "tiny" else full_size_components()
    pipe = BIVDiffControllablePipeline(**components)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    control = np.random.default_rng(0).random((args.frames, size, size, 3)).astype(np.float32)
    call = dict(
        prompt="a bear walking through a snow mountain",
        conditioning_frames=control,
        num_inference_steps=args.steps,
        generator=torch.Generator(device).manual_seed(42),
        output_type="latent",
        return_idm_frames=False,
    )
    print(f"device={device} dtype={args.dtype} size={args.size} frames={args.frames} {size}x{size} steps={args.steps}")

    timed(pipe, device, **{**call, "num_inference_steps": 1})  # warm-up: kernels, allocator

    # One full call with its per-stage breakdown.
    seconds, calls = timed(pipe, device, **{**call, "output_type": "np", "mixing_ratio": 0.5})
    print("\nper stage (mixing_ratio 0.5):")
    print_stage_table(pipe.stage_log, calls)
    print(f"{'total':<24}{seconds:10.3f}")

    # Ratios, each from runs made here, one after the other.
    sequential, _ = timed(pipe, device, **{**call, "frame_batch_size": 1, "mixing_ratio": 1.0})
    batched, _ = timed(pipe, device, **{**call, "frame_batch_size": args.frames, "mixing_ratio": 1.0})
    print(
        f"\nstage 1, {args.frames} frames per call vs one: time ratio {sequential / batched:.2f} (>1: batching faster)"
    )

    # Cross-frame attention in stage 1: the attention, then the first frame carried by each later batch of a video.
    def stage1_seconds(**options) -> float:
        timed(pipe, device, **{**call, "mixing_ratio": 1.0, **options})
        return next(e["seconds"] for e in stage_summary(pipe.stage_log, {}) if e["stage"] == "frame-wise generation")

    for size in (args.frames, max(2, args.frames // 2)):
        plain = stage1_seconds(frame_batch_size=size)
        crossed = stage1_seconds(frame_batch_size=size, cross_frame_attention=True)
        computed = sum(map(len, frame_batches(1, args.frames, size, anchored=True)))
        print(f"cross_frame_attention, {size} frames per call ({computed} frames computed): stage-1 time ratio "
              f"{crossed / plain:.2f} against without")

    both, both_calls = timed(pipe, device, **{**call, "mixing_ratio": 1.0 - 1e-6})
    skipped, skipped_calls = timed(pipe, device, **{**call, "mixing_ratio": 1.0})
    video_calls = lambda c: sum(stage.get("video_unet", 0) for stage in c.values())  # noqa: E731
    print(
        f"mixing_ratio 1 skips the video inversion: {video_calls(both_calls)} -> {video_calls(skipped_calls)} "
        f"video-UNet calls, time ratio {both / skipped:.2f} against running both branches as the original did"
    )


if __name__ == "__main__":
    main()
