"""`bivdiff run`, step by step: check the config and inputs, find the models, then load, run and write a new run
folder. Everything that can fail on bad input fails before the first model is loaded."""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from bivdiff import configs as shipped
from bivdiff.config import RunConfig, load_config
from bivdiff.errors import ConfigError, UserError
from bivdiff.inputs import SourceVideo, read_source
from bivdiff.models_resolution import ResolvedModel, Resolver, is_offline
from bivdiff.tasks import Context, Inputs, Outputs, Task, task_for

FIRST_TRY = "controllable_video_generation_with_controlnet_and_zeroscope"
TINY_NOTE = (
    "TINY MODE: tiny models with random weights, built offline. The pictures are noise: this run only shows "
    "that the command line, the pipeline and the outputs work. Drop --tiny for real results."
)
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass
class RunRequest:
    """What the command line asked for."""

    config_name: str | None = None
    config_path: str | None = None
    overrides: list[str] = field(default_factory=list)
    tiny: bool = False
    checkpoints: str = "checkpoints"
    offline: bool = False
    dry_run: bool = False
    cache_dir: str | None = None


def locate_config(request: RunRequest) -> tuple[Path, str]:
    """The YAML file and the name of the run's config."""
    if request.config_path and request.config_name:
        raise ConfigError("Give either --config-name NAME or --config PATH, not both.")
    if request.config_path:
        path = Path(request.config_path).expanduser()
        return path, path.stem
    if not request.config_name:
        raise ConfigError(
            "Which task? Give --config-name NAME (or --config PATH.yaml). Shipped configs:\n  "
            + "\n  ".join(shipped.config_names())
            + f"\nTry one without any model download: bivdiff run --tiny --config-name {FIRST_TRY}"
        )
    try:
        path = shipped.config_path(request.config_name)
    except KeyError:
        raise ConfigError(unknown_config_message(request.config_name)) from None
    return path, path.stem


def unknown_config_message(name: str) -> str:
    import difflib

    names = shipped.config_names()
    stem = name.removesuffix(".yaml")
    near = [n for n in names if stem and stem.lower() in n] or difflib.get_close_matches(stem, names, n=3, cutoff=0.4)
    message = f"No shipped config named {name!r}."
    if near:
        message += " Did you mean: " + ", ".join(near) + "?"
    else:
        message += " Shipped configs: " + ", ".join(names) + "."
    return message + " For your own YAML file use --config PATH (bivdiff list shows the shipped ones)."


@dataclass
class Plan:
    """A checked run: config, task, source frames and model sources."""

    config: RunConfig
    task: Task
    source: SourceVideo
    models: dict[str, ResolvedModel]
    offline: bool
    checkpoints: Path
    cache_dir: str | None


def plan_run(request: RunRequest) -> Plan:
    """Check everything that can be checked without loading a model."""
    path, name = locate_config(request)
    config = load_config(path, request.overrides, tiny=request.tiny, name=name)
    task = task_for(config)
    task.check_environment(config)
    source = read_source(config)
    task.read_inputs(config)
    offline = True if request.tiny else is_offline(request.offline)
    checkpoints = Path(request.checkpoints).expanduser()
    models = {}
    if not request.tiny:
        models = Resolver(offline=offline, cache_dir=request.cache_dir).resolve(task.model_specs(config, checkpoints))
    return Plan(config, task, source, models, offline, checkpoints, request.cache_dir)


def describe_plan(plan: Plan) -> str:
    config, model, source = plan.config, plan.config.model, plan.source
    clip = "the Big Buck Bunny clip shipped with bivdiff" if source.shipped else str(source.path)
    lines = [
        f"config: {config.name} ({plan.task.title} + {config.vdm})",
        f"input:  {clip}: {model['video_length']} frames, every {model['frame_rate']} from frame "
        f"{model['start_frame']}, at {model['width']}x{model['height']} ({source.fps:g} fps)",
    ]
    if config.tiny:
        lines.append(TINY_NOTE)
    else:
        lines += [f"model:  {resolved.describe()}" for resolved in plan.models.values()]
    return "\n".join(lines)


def execute(request: RunRequest, log=print) -> Path | None:
    """Run a request; returns the run folder (None for a dry run)."""
    import bivdiff.run_folder as folder_io

    started = time.perf_counter()
    plan = plan_run(request)
    log(describe_plan(plan))
    if request.dry_run:
        log("Dry run: the config, the inputs and the models are all in place; nothing was run.")
        return None
    config = plan.config
    folder = folder_io.new_run_folder(config.model["output_path"], config.name)
    log(f"output: {folder}")
    folder_io.write_text(folder / "config.yaml", config_header(config) + config.to_yaml())
    if config.tiny:
        folder_io.write_text(folder / "TINY_MODE_NOISE.txt", TINY_NOTE + "\n")
    try:
        stats = run_in_folder(plan, folder, log)
    except BaseException as err:
        folder_io.write_text(folder / "error.txt", "".join(traceback.format_exception(err)))
        log(f"The run failed; details in {folder / 'error.txt'}")
        raise
    stats["seconds"]["total"] = time.perf_counter() - started
    folder_io.write_json(folder / "stats.json", stats)
    log(f"Done in {stats['seconds']['total']:.1f} s: {folder / 'video_by_bivdiff.mp4'}")
    log(f"Compare: {folder / 'comparison.mp4'}   Stats: {folder / 'stats.json'}")
    if config.tiny:
        log(TINY_NOTE)
    return folder


def config_header(config: RunConfig) -> str:
    lines = [f"# Resolved config of this run of {config.name}. Rerun it with:", f"#   {config.rerun_command()}"]
    if config.tiny:
        lines.append("# A --tiny run: random weights, the pictures are noise.")
    return "\n".join(lines) + "\n"


def run_in_folder(plan: Plan, folder: Path, log) -> dict:
    import torch

    from bivdiff.profiling import NetworkCallCounter, peak_memory, stage_summary

    config, task = plan.config, plan.task
    seconds = {}
    clock = time.perf_counter()
    inputs = task.prepare_inputs(config, plan.source.frames, plan.models)
    seconds["conditions"] = time.perf_counter() - clock

    log("Building tiny models ..." if config.tiny else "Loading models ...")
    clock = time.perf_counter()
    device, dtype = pick_device(config.model["device"]), pick_dtype(config, config.model["device"])
    pipe = build_pipeline(plan, device, dtype)
    seconds["load_models"] = time.perf_counter() - clock

    clock = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(config.model["seed"])
    arguments = task.arguments(pipe, config, inputs, generator)
    with NetworkCallCounter(pipe) as counter:
        try:
            result = pipe(**arguments)
        except ValueError as err:
            # The pipelines check their inputs before any model runs and say what is wrong in a ValueError.
            raise UserError(f"{type(pipe).__name__} refused the inputs: {err}") from err
    outputs = task.outputs(result)
    seconds["pipeline"] = time.perf_counter() - clock

    clock = time.perf_counter()
    log("Writing videos ...")
    files = write_videos(folder, config, plan.source, inputs, outputs)
    seconds["write_outputs"] = time.perf_counter() - clock

    stage_log = list(getattr(pipe, "stage_log", []) or [])
    calls = counter.as_dict()
    return {
        "config": config.name,
        "task": task.title,
        "idm": config.idm,
        "vdm": config.vdm,
        "tiny": config.tiny,
        "note": TINY_NOTE if config.tiny else None,
        "overrides": list(config.overrides),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "video": {
            "frames": len(outputs.frames),
            "width": config.model["width"],
            "height": config.model["height"],
            "fps": plan.source.fps,
            "frame_stride": config.model["frame_rate"],
            "source": str(plan.source.path),
            "source_fps": plan.source.source_fps,
        },
        "models": {key: resolved.location for key, resolved in plan.models.items()} or "tiny random weights",
        "seconds": seconds,
        "stages": stage_summary(stage_log, calls),
        "unet_calls": calls,
        "unet_calls_total": sum(sum(c.values()) for c in calls.values()),
        "peak_memory": peak_memory(stage_log, device.type),
        "files": files,
    }


def pick_device(value: str):
    import torch

    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(value)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"Model.device={value} but no CUDA device is available here: use Model.device=cpu (or auto).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"Model.device={value} but MPS is not available here: use Model.device=cpu (or auto).")
    return device


def pick_dtype(config: RunConfig, device_value: str):
    """fp16 on a GPU and fp32 on a CPU by default; tiny random models always default to fp32."""
    import torch

    name = config.model["dtype"]
    if name == "auto":
        on_gpu = pick_device(device_value).type == "cuda"
        name = "fp16" if on_gpu and not config.tiny else "fp32"
    return getattr(torch, DTYPE_NAMES[name])


def build_pipeline(plan: Plan, device, dtype):
    import torch

    config, task = plan.config, plan.task
    if config.tiny:
        components = task.tiny_components(config)
    else:
        ctx = Context(checkpoints=plan.checkpoints, offline=plan.offline, cache_dir=plan.cache_dir, torch_dtype=dtype)
        components = task.load_components(config, plan.models, ctx)
    pipe = task.pipeline_class()(**components)
    # Real models are loaded in `dtype`; tiny ones are built in fp32 and cast only when asked for another dtype
    # (a no-op cast still makes diffusers warn about modules to keep in fp32).
    if config.tiny and dtype != torch.float32:
        pipe.to(dtype=dtype)
    if config.model["video_window"]:
        pipe.enable_video_windows(size=config.model["video_window"], overlap=config.model["video_window_overlap"])
    if config.model["cpu_offload"]:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def write_videos(folder: Path, config: RunConfig, source: SourceVideo, inputs: Inputs, outputs: Outputs) -> dict:
    """Every video as MP4 and GIF, and the labelled comparison; returns {what: [files]}."""
    from bivdiff.run_folder import comparison_frames, write_clip

    fps = source.fps
    noise = " (tiny: noise)" if config.tiny else ""
    files = {"source_video": write_clip(folder, "source_video", source.frames, fps)}
    columns = [("source", source.frames)]
    if inputs.condition is not None:
        stem = f"{inputs.condition_name}_condition"
        files[stem] = write_clip(folder, stem, inputs.condition, fps)
        columns.append((inputs.condition_label or "condition", inputs.condition))
    if inputs.mask is not None:
        files["source_mask"] = write_clip(folder, "source_mask", inputs.mask, fps)
        columns.append((inputs.condition_label or "mask", inputs.mask))
    if outputs.source_frames is not None:
        files["video_inverted_and_reconstructed"] = write_clip(
            folder, "video_inverted_and_reconstructed", outputs.source_frames, fps
        )
    if outputs.idm_frames is not None:
        files["video_by_idm"] = write_clip(folder, "video_by_idm", outputs.idm_frames, fps)
        columns.append((f"image model: {config.idm}{noise}", outputs.idm_frames))
    files["video_by_bivdiff"] = write_clip(folder, "video_by_bivdiff", outputs.frames, fps)
    columns.append((f"BIVDiff: {config.vdm}{noise}", outputs.frames))
    files["comparison"] = write_clip(folder, "comparison", comparison_frames(columns), fps)
    files["config"] = ["config.yaml"]
    files["stats"] = ["stats.json"]
    return files


def main_error(err: BaseException) -> int:
    """Print a user error without a traceback; 2 for config errors, 1 for the rest."""
    print(f"error: {err}", file=sys.stderr)
    return 2 if isinstance(err, ConfigError) else 1
