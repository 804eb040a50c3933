"""Benchmark BIVDiff's ControlNet task with each video model at its real architecture (random weights): per-stage
time, network calls and peak memory, and each model's cost relative to the first, all measured in one run.

    python benchmarks/benchmark_video_models.py --size 64 --steps 2                              # CPU
    python benchmarks/benchmark_video_models.py --device cuda --dtype fp16 --size 512 --steps 50  # GPU

Video models (nothing is downloaded; the image side is SD-1.5 + ControlNet, as in benchmark_pipelines.py):
- `modelscope`: `UNet3DConditionModel` at text-to-video-ms-1.7b's config with its OpenCLIP-H text tower. ZeroScope
  v2 is a fine-tune of it with the same architecture, so this row stands for both.
- `animatediff`: `UNetMotionModel` of SD-1.5's UNet and a MotionAdapter at the v1-5-3 config, built on the image
  UNet's own weights; its text encoder is the image model's CLIP-L.
- `vidrd`: `VidRDUNet3DConditionModel` at SD-2.1-base size with the OpenCLIP-H text tower.
- `animatediff+control`: `animatediff` with `control_smoothing=True` (the ControlNet also guides smoothing).
A model the pipeline cannot run is reported with its error and the others still run.
"""

from __future__ import annotations

import argparse
import gc

import numpy as np
import torch
from benchmark_pipelines import clip_text_encoder, full_size_image_components, print_stage_table, timed

from bivdiff import BIVDiffControllablePipeline
from bivdiff import tiny_models as tiny
from bivdiff.profiling import peak_rss_bytes, stage_summary

VIDEO_MODELS = ("modelscope", "animatediff", "vidrd", "animatediff+control")
VIDEO_STAGES = ("video inversion", "temporal smoothing")


def video_components(name: str, image: dict) -> dict:
    """The video side of `name` at its real architecture, random weights."""
    if name == "modelscope":
        from diffusers import UNet3DConditionModel

        # text-to-video-ms-1.7b's unet/config.json is UNet3DConditionModel's defaults with sample_size 32.
        return dict(
            video_unet=UNet3DConditionModel(sample_size=32),
            video_text_encoder=clip_text_encoder(1024, 23, 16),
            video_tokenizer=tiny.tiny_tokenizer(),
        )
    if name == "animatediff":
        from diffusers import MotionAdapter

        from bivdiff.models import motion_unet_sharing_weights

        # guoyww/animatediff-motion-adapter-v1-5-3: MotionAdapter's defaults without the mid-block motion module.
        adapter = MotionAdapter(motion_max_seq_length=32, use_motion_mid_block=False)
        return dict(
            video_unet=motion_unet_sharing_weights(image["unet"], adapter),
            video_text_encoder=image["text_encoder"],
            video_tokenizer=image["tokenizer"],
        )
    if name == "vidrd":
        from bivdiff.models import VidRDUNet3DConditionModel

        return dict(
            video_unet=VidRDUNet3DConditionModel(),  # its defaults are VidRD's SD-2.1-base-sized UNet
            video_text_encoder=clip_text_encoder(1024, 23, 16),
            video_tokenizer=tiny.tiny_tokenizer(),
        )
    raise ValueError(f"unknown video model {name!r}; choose from {VIDEO_MODELS}")


def weight_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct tensor storages the modules hold: a tensor two models share counts once."""
    storages = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def mib(value: int | None) -> str:
    return f"{value / 2**20:.0f}" if value is not None else "-"


def use_xformers(pipe) -> str:
    try:
        pipe.enable_xformers_memory_efficient_attention()
        return "xformers"
    except Exception as err:  # absent, or a processor the model does not take: keep PyTorch SDPA
        print(f"  xformers unavailable ({type(err).__name__}: {str(err).splitlines()[0][:100]}); using SDPA")
        return "sdpa"


def benchmark_model(name: str, image: dict, call: dict, device, dtype, xformers: bool) -> dict:
    model, _, switch = name.partition("+")
    call = {**call, "control_smoothing": switch == "control"}
    with torch.device(device):
        video = video_components(model, image)
    pipe = BIVDiffControllablePipeline(**image, **video)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    result = {"model": name, "attention": use_xformers(pipe) if xformers else "sdpa"}
    models = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    result["weights"] = weight_bytes(*models)
    if model == "animatediff":
        # What `UNetMotionModel.from_unet2d` would hold: its own copy of every spatial tensor.
        result["weights_unshared"] = result["weights"] + weight_bytes(pipe.unet)
    try:
        timed(pipe, device, **{**call, "num_inference_steps": 1})  # warm-up: kernels, allocator
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result["seconds"], result["calls"] = timed(pipe, device, **call)
        result["stage_log"] = pipe.stage_log
        result["peak"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    except Exception as err:  # e.g. a UNet whose call contract the pipeline does not meet yet
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    del pipe, video, models
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def video_seconds(result: dict) -> float:
    return sum(e["seconds"] or 0 for e in stage_summary(result["stage_log"], {}) if e["stage"] in VIDEO_STAGES)


def print_stages(result: dict) -> None:
    print(f"\n{result['model']} ({result['attention']}):")
    if "error" in result:
        print(f"  not run: {result['error']}")
        return
    print_stage_table(result["stage_log"], result["calls"], indent="  ")
    print(f"  {'total':<24}{result['seconds']:10.3f}{mib(result['peak']):>10}", flush=True)


def print_summary(results: list[dict]) -> None:
    ran = [r for r in results if "error" not in r]
    base = ran[0] if ran else None
    header = f"{'total s':>10}{'video s':>10}{'x total':>9}{'x video':>9}{'peak MiB':>10}  {'weights MiB':>11}"
    print(f"\n{'video model':<20}{header}")
    for r in results:
        weights = mib(r["weights"]) + (f" (unshared {mib(r['weights_unshared'])})" if "weights_unshared" in r else "")
        if "error" in r:
            print(f"{r['model']:<20}{'not run':>10}{'':>10}{'':>9}{'':>9}{'':>10}  {weights:>11}")
            continue
        ratio = r["seconds"] / base["seconds"]
        video_ratio = video_seconds(r) / max(video_seconds(base), 1e-9)
        print(
            f"{r['model']:<20}{r['seconds']:10.2f}{video_seconds(r):10.2f}{ratio:9.2f}{video_ratio:9.2f}"
            f"{mib(r['peak']):>10}  {weights:>11}"
        )
    if base is not None:
        print(f"(x: time relative to {base['model']}, measured in this run; video s = video inversion + smoothing)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=VIDEO_MODELS, default=list(VIDEO_MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--size", type=int, default=512, help="square frame size in pixels, a multiple of 64")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--mixing-ratio",
        type=float,
        default=0.5,
        help="0.5 runs both inversion branches (ControlNet's default 1.0 skips the video one)",
    )
    parser.add_argument("--xformers", action="store_true", help="use xformers attention where installed")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    with torch.device(device):
        image = full_size_image_components()
    control = np.random.default_rng(0).random((args.frames, args.size, args.size, 3)).astype(np.float32)
    call = dict(
        prompt="a bear walking through a snow mountain",
        conditioning_frames=control,
        num_inference_steps=args.steps,
        mixing_ratio=args.mixing_ratio,
        generator=torch.Generator(device).manual_seed(42),
        output_type="np",
        return_idm_frames=False,
    )
    print(
        f"device={device} dtype={args.dtype} frames={args.frames} {args.size}x{args.size} steps={args.steps} "
        f"mixing_ratio={args.mixing_ratio} torch={torch.__version__}"
    )
    results = []
    for name in args.models:
        print(f"running {name} ...", flush=True)
        results.append(benchmark_model(name, image, call, device, dtype, args.xformers))
        print_stages(results[-1])  # as soon as it is known, so a run cut short still reports the models it ran
    print_summary(results)
    if device.type != "cuda":
        print(f"process peak RSS: {mib(peak_rss_bytes())} MiB (all models together)")


if __name__ == "__main__":
    main()
