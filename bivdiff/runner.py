"""A run in one pass: config -> plan (task, inputs, resolved models) -> pipeline -> outputs -> run folder.

Everything that can fail on bad input fails while planning, before the first model is loaded. Building the pipeline
(`build_pipeline`) is separate from calling it (`run_job`), so a caller running many jobs can load a model set once
(`Plan.model_set` says which plans share one) and reuse it. `run_config` is the whole pass as one call.
"""

import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bivdiff import conditions, configs as shipped
from bivdiff.config import RunConfig, load_config
from bivdiff.errors import ConfigError, UserError
from bivdiff.models_resolution import NATIVE_NUM_FRAMES, ModelSpec, ResolvedModel, first_line, model_specs, resolve
from bivdiff.tasks import Inputs, Task, task_for
from bivdiff.video_io import TooFewFramesError, VideoClip, default_clip_path, default_mask_path, read_video_clip

FIRST_TRY = "controllable_video_generation_with_controlnet_and_zeroscope"
TINY_NOTE = (
    "TINY MODE: tiny models with random weights, built offline. The pictures are noise: this run only shows "
    "that the command line, the pipeline and the outputs work. Drop --tiny for real results."
)
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# GIFs and image folders carry no frame rate of their own (a folder none at all): the original wrote 8 fps.
FALLBACK_FPS = 8.0
# Stage-1 sampler names of the configs whose diffusers class is not the name + "Scheduler".
SCHEDULER_CLASSES = {"EulerAncestral": "EulerAncestralDiscrete", "Euler": "EulerDiscrete", "LMS": "LMSDiscrete"}


@dataclass
class Plan:
    """A checked run: config, task, inputs and model sources; nothing loaded yet."""

    config: RunConfig
    task: Task
    inputs: Inputs
    source: VideoClip
    source_path: Path
    specs: list[ModelSpec]
    models: dict[str, ResolvedModel]  # by spec key; none with --tiny
    cache_dir: str | None = None

    @property
    def fps(self) -> float:
        """Of the result: the source's frame rate divided by the stride."""
        stride = self.config.model["frame_rate"]
        return (self.source.fps or FALLBACK_FPS * stride) / stride

    @property
    def model_set(self) -> tuple:
        """Plans with equal model sets can share one loaded pipeline (only the call arguments differ)."""
        model, options = self.config.model, self.config.idm_options
        # Each spec key names its model (the video model's, a condition's ControlNet); with --tiny none is resolved.
        models = tuple((spec.key, getattr(self.models.get(spec.key), "location", None)) for spec in self.specs)
        return (self.config.idm, self.config.tiny, options["scheduler"], models, model["device"], model["dtype"],
                model["cpu_offload"], model["video_window"], model["video_window_overlap"])


def config_file(config: str | os.PathLike | None) -> tuple[Path, str]:
    """The YAML file and the run's name of a shipped config name or a YAML path."""
    if config is None:
        raise ConfigError(
            "Which task? Give --config-name NAME (or --config PATH.yaml). Shipped configs:\n  "
            + "\n  ".join(shipped.config_names())
            + f"\nTry one without any model download: bivdiff run --tiny --config-name {FIRST_TRY}"
        )
    text = str(config)
    looks_like_path = text.endswith((".yaml", ".yml")) and (Path(text).is_file() or os.sep in text)
    if isinstance(config, os.PathLike) or looks_like_path:
        return Path(text).expanduser(), Path(text).stem
    try:
        return shipped.config_path(text), text.removesuffix(".yaml")
    except KeyError:
        import difflib

        names, stem = shipped.config_names(), text.removesuffix(".yaml")
        near = [n for n in names if stem and stem.lower() in n] or difflib.get_close_matches(stem, names, 3, 0.4)
        message = f"No shipped config named {text!r}."
        message += f" Did you mean: {', '.join(near)}?" if near else f" Shipped configs: {', '.join(names)}."
        raise ConfigError(message + " For your own YAML file use --config PATH (bivdiff list shows them).") from None


def read_input(config: RunConfig, dotted: str, as_mask: bool = False) -> tuple[VideoClip, Path]:
    """The video a config key names (the shipped clip or mask when null), with the run's frame selection, so
    frame i of every input is the same moment; a bad or short video fails in config terms."""
    model = config.model
    section, key = dotted.rsplit(".", 1)
    value = (model if section == "Model" else config.idm_options)[key]
    path = (default_mask_path() if as_mask else default_clip_path()) if value is None else Path(value).expanduser()
    length, stride, start = model["video_length"], model["frame_rate"], model["start_frame"]
    try:
        clip = read_video_clip(path, length, stride, start, model["height"], model["width"], model["resize_mode"],
                               as_mask=as_mask)
    except TooFewFramesError as err:
        raise ConfigError(
            f"{dotted}: {err}\nIn config terms: Model.video_length={length} frames at Model.frame_rate={stride} "
            f"(the frame stride) from Model.start_frame={start} need {start + (length - 1) * stride + 1} source "
            "frames. Lower one of them on the command line, e.g. Model.frame_rate=1, or give a longer video."
        ) from err
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{dotted}: {err}") from err
    return clip, path


def plan_run(
    config, overrides=(), tiny=False, checkpoints="checkpoints", offline=False, cache_dir=None, download=True
) -> Plan:
    """Check everything that can be checked without loading a model."""
    path, name = config_file(config)
    run_config = load_config(path, list(overrides), tiny=tiny, name=name)
    task = task_for(run_config)
    source, source_path = read_input(run_config, "Model.video_path")
    inputs = task.inputs(run_config, source.frames, lambda key, mask: read_input(run_config, key, mask)[0].frames)
    specs, models = model_specs(run_config, task, Path(checkpoints).expanduser()), {}
    if not tiny:
        from huggingface_hub.constants import is_offline_mode  # HF_HUB_OFFLINE=1 means --offline too

        models = resolve(specs, offline or is_offline_mode(), cache_dir, download=download)
    return Plan(run_config, task, inputs, source, source_path, specs, models, cache_dir)


def describe_plan(plan: Plan) -> str:
    config, model = plan.config, plan.config.model
    clip = "the Big Buck Bunny clip shipped with bivdiff" if model["video_path"] is None else str(plan.source_path)
    lines = [
        f"config: {config.name} ({plan.task.title} + {config.vdm})",
        f"input:  {clip}: {model['video_length']} frames, every {model['frame_rate']} from frame "
        f"{model['start_frame']}, at {model['width']}x{model['height']} ({plan.fps:g} fps)",
    ]
    lines += [TINY_NOTE] if config.tiny else [f"model:  {resolved.describe()}" for resolved in plan.models.values()]
    return "\n".join(lines)


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


def pick_dtype(config: RunConfig):
    """fp16 on a GPU and fp32 on a CPU by default; tiny random models always default to fp32."""
    import torch

    name = config.model["dtype"]
    if name == "auto":
        name = "fp16" if pick_device(config.model["device"]).type == "cuda" and not config.tiny else "fp32"
    return getattr(torch, DTYPE_NAMES[name])


def make_scheduler(name: str, config: dict):
    """The stage-1 sampler: `default` rebuilds the class the config names, any other name that class from it."""
    import diffusers

    class_name = SCHEDULER_CLASSES.get(name, name) + "Scheduler"
    class_name = config.get("_class_name", "DDIMScheduler") if name == "default" else class_name
    # SD-1.5's own PNDM config skips the Runge-Kutta warm-up; a config without the key (DDIM's) would turn it on,
    # which is another sampler and breaks below 4 steps.
    extra = {"skip_prk_steps": config.get("skip_prk_steps", True)} if class_name == "PNDMScheduler" else {}
    return getattr(diffusers, class_name).from_config(config, **extra)


def build_pipeline(plan: Plan, device=None, dtype=None, loaded: dict | None = None):
    """The task's pipeline on `device`: tiny random components, or the resolved models passed as components to the
    pipeline's own `from_pretrained(SD-1.5, component=...)`. `loaded` maps (location, subfolder, class, dtype) to
    models loaded before, which are reused rather than read again, and gains the new."""
    import torch

    config, model = plan.config, plan.config.model
    device = device or pick_device(model["device"])
    dtype = dtype or pick_dtype(config)
    components = pipeline_components(plan, dtype, {} if loaded is None else loaded)
    if config.tiny:
        pipe = plan.task.pipeline_class()(**components)
        # Tiny models are built in fp32 and cast only when asked for another dtype (a no-op cast still makes
        # diffusers warn about modules to keep in fp32).
        pipe = pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    else:
        pipeline_class = plan.task.pipeline_class()
        # No image prompt on the command line, so no IP-Adapter image side (SD-1.5's model index names a feature
        # extractor, which is not fetched).
        image_side = dict.fromkeys({"image_encoder", "feature_extractor"} & set(pipeline_class._optional_components))
        pipe = pipeline_class.from_pretrained(plan.models["sd15"].location, **components, **image_side,
                                              torch_dtype=dtype, **_cached(plan))
    if model["video_window"]:
        pipe.enable_video_windows(size=model["video_window"], overlap=model["video_window_overlap"])
    if model["cpu_offload"]:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def _cached(plan: Plan) -> dict:
    # Everything was fetched into the cache (or found locally) while planning.
    return dict(local_files_only=True, cache_dir=plan.cache_dir)


def pipeline_components(plan: Plan, dtype, loaded: dict) -> dict:
    """Every component of the plan's pipeline: the components of each model (tiny random ones with --tiny); an image
    model's own UNet in SD-1.5's place, whose UNet then inverts frame by frame; AnimateDiff's motion UNet on its
    base model's UNet (by default SD-1.5's, held once), with that model's CLIP as the video text encoder; and the
    stage-1 and inversion samplers."""
    import diffusers
    import transformers

    from bivdiff import models, tiny_models
    from bivdiff.schedulers import BIVDiffDDIMInverseScheduler

    config, components, sampler_configs = plan.config, {}, []

    def load(location: str, subfolder: str, class_name: str):
        known = (location, subfolder, class_name, str(dtype))
        if known not in loaded:
            module = transformers if class_name.startswith("CLIP") else models if "VidRD" in class_name else diffusers
            dtype_name = "dtype" if class_name == "CLIPTextModel" else "torch_dtype"
            args = {} if class_name == "CLIPTokenizer" else {dtype_name: dtype}
            loaded[known] = getattr(module, class_name).from_pretrained(location, subfolder=subfolder, **args,
                                                                        **_cached(plan))
        return loaded[known]

    channels = conditions.condition_channels(config.idm, config.idm_options.get("condition"))  # a tiny adapter's
    for spec in plan.specs:
        if config.tiny:
            made = tiny_models.tiny_components_of(spec.key, channels)
            if "scheduler" in spec.parts:
                sampler_configs.append(tiny_models.sd15_scheduler_config())
        else:
            location = plan.models[spec.key].location
            made = {name: load(location, *where) for name, where in spec.components.items()}
            if "scheduler" in spec.parts:
                sampler_configs.append(diffusers.DDIMScheduler.load_config(location, subfolder="scheduler",
                                                                           **_cached(plan)))
            if spec.key in NATIVE_NUM_FRAMES:
                made["video_unet"].register_to_config(native_num_frames=NATIVE_NUM_FRAMES[spec.key])
        if "unet" in made and "unet" in components:
            components["inversion_unet"] = components["unet"]
        components.update(made)
    if "motion_adapter" in components:
        base = components.pop("motion_base", None) or components.get("inversion_unet") or components["unet"]
        components["video_unet"] = models.motion_unet_sharing_weights(base, components.pop("motion_adapter"))
        components.setdefault("video_text_encoder", components["text_encoder"])
        components.setdefault("video_tokenizer", components["tokenizer"])
    # Smoothing derives its DDIM schedule from stage 1's sampler config, so SD-1.5's DDIM settings (no sample
    # clipping, alphas_cumprod[0] as the final alpha) lie under the image model's own sampler keys.
    stage1 = {key: value for sampler in sampler_configs for key, value in sampler.items()}
    components["scheduler"] = make_scheduler(config.idm_options["scheduler"], stage1)
    components["inverse_scheduler"] = BIVDiffDDIMInverseScheduler.from_config(sampler_configs[0])
    return components


def call_arguments(plan: Plan, generator) -> dict:
    """Every keyword argument of the pipeline call: the shared ones, then the task's own."""
    model, options, mixed = plan.config.model, plan.config.idm_options, plan.config.mixed_inversion
    shared = dict(video_prompt=model["vdm_prompt"] + options["prompt_suffix"], generator=generator, output_type="pil")
    shared.update({key: options[key] for key in ("negative_prompt", "mixing_ratio")})
    shared.update({key: mixed[key] for key in ("pool_norms_over_frames", "reencode_frames", "strength")})
    keys = ("num_inference_steps", "guidance_scale", "frame_batch_size", "decode_chunk_size", "height", "width")
    return {**shared, **{key: model[key] for key in keys}, **plan.task.call_arguments(plan.config, plan.inputs)}


def run_job(pipe, plan: Plan, progress: Callable[[int, int], None] | None = None):
    """Call a built pipeline on a plan; returns the pipeline's output and its network calls per stage."""
    import torch

    from bivdiff.profiling import NetworkCallCounter

    arguments = call_arguments(plan, torch.Generator("cpu").manual_seed(plan.config.model["seed"]))
    if progress is not None:
        steps = plan.config.model["num_inference_steps"]
        arguments["callback_on_step_end"] = lambda _pipe, step, _timestep, _tensors: progress(step + 1, steps) or {}
    # FreeU is the video UNet's state, not a call argument: set on every job, as a batch reuses pipelines and models.
    freeu = plan.config.model["video_freeu"]
    if freeu:
        pipe.video_unet.enable_freeu(*freeu)
    else:
        pipe.video_unet.disable_freeu()
    with NetworkCallCounter(pipe) as counter:
        try:
            result = pipe(**arguments)
        except ValueError as err:
            # The pipelines check their inputs before any model runs and say what is wrong in a ValueError.
            raise UserError(f"{type(pipe).__name__} refused the inputs: {err}") from err
    return result, counter.as_dict()


def run_config(config: str | os.PathLike, overrides: Sequence[str] = (), *, tiny: bool = False,
               checkpoints: str | os.PathLike = "checkpoints", output_dir: str | os.PathLike | None = None,
               progress: Callable[[int, int], None] | None = None, offline: bool = False, dry_run: bool = False,
               cache_dir: str | None = None, log: Callable[[str], None] = lambda text: None) -> Path | None:
    """Run a config (a shipped name or a YAML path) with `key=value` overrides and write a new run folder under
    `output_dir` (default: the config's Model.output_path); returns the folder (None for a dry run).

    `progress(step, total)` is called after each denoising step of temporal smoothing. Bad input raises the
    UserError subclasses whose messages `bivdiff run` prints, before any model loads.
    """
    started = time.perf_counter()
    overrides = [*overrides, *([f"Model.output_path={output_dir}"] if output_dir is not None else [])]
    plan = plan_run(config, overrides, tiny, checkpoints, offline, cache_dir, download=not dry_run)
    log(describe_plan(plan))
    if dry_run:
        log("Dry run: the config, the inputs and the models are all in place; nothing was run.")
        return None
    return run_plan(plan, progress=progress, log=log, started=started)


class PipelineCache:
    """The pipeline of the last model set built, kept for the next plan with the same `Plan.model_set`. A plan with
    another set gets a new pipeline that reuses the models both sets share (only what differs is loaded), and the
    models only the old set used are let go: one model set in memory at a time."""

    def __init__(self):
        self.key, self.pipe, self.loaded = None, None, {}

    def get(self, plan: Plan, device, dtype):
        key = (plan.model_set, str(device), str(dtype))
        if key != self.key:
            # Offload hooks are attached to the models themselves, so offloaded models are not shared; models the
            # new set does not name are let go before it loads.
            locations = {resolved.location for resolved in plan.models.values()}
            offload = plan.config.model["cpu_offload"]
            loaded = {known: model for known, model in self.loaded.items() if known[0] in locations and not offload}
            self.clear()
            self.pipe, self.key = build_pipeline(plan, device, dtype, loaded), key
            in_use = [id(component) for component in self.pipe.components.values()]
            self.loaded = {known: model for known, model in loaded.items() if id(model) in in_use}
        return self.pipe

    def clear(self):
        if self.pipe is not None:
            import gc

            import torch

            self.key = self.pipe = None
            self.loaded = {}
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def run_plan(plan: Plan, *, output_root: str | os.PathLike | None = None, name: str | None = None,
             pipelines: PipelineCache | None = None, device=None, progress: Callable[[int, int], None] | None = None,
             log: Callable[[str], None] = lambda text: None, started: float | None = None) -> Path:
    """Run a checked plan into a new run folder `<output_root>/<name>-<timestamp>/` (default: Model.output_path and
    the config's name), written under a staging name and renamed when complete; returns the folder.

    `pipelines` keeps a built pipeline for the next plan with the same model set (a batch passes one). A failed
    run's folder holds error.txt with the traceback, and the exception carries it as `run_folder`.
    """
    from bivdiff.run_folder import publish_run_folder, staging_folder, write_json, write_outputs, write_text

    started = time.perf_counter() if started is None else started
    config = plan.config
    folder = staging_folder(output_root or config.model["output_path"], name or config.name)
    header = [f"# Resolved config of this run of {config.name}. Rerun it with:", f"#   {config.rerun_command()}"]
    header += ["# A --tiny run: random weights, the pictures are noise."] if config.tiny else []
    write_text(folder / "config.yaml", "\n".join(header) + "\n" + config.to_yaml())
    if config.tiny:
        write_text(folder / "TINY_MODE_NOISE.txt", TINY_NOTE + "\n")
    seconds, clock = {}, time.perf_counter()

    def lap(stage: str):
        nonlocal clock
        seconds[stage], clock = time.perf_counter() - clock, time.perf_counter()

    try:
        plan.inputs = plan.task.annotate(config, plan.inputs, plan.models)
        lap("conditions")
        log("Building tiny models ..." if config.tiny else "Loading models ...")
        device, dtype = device or pick_device(config.model["device"]), pick_dtype(config)
        try:
            pipe = (pipelines or PipelineCache()).get(plan, device, dtype)
            lap("load_models")
            result, calls = run_job(pipe, plan, progress)
        except (MemoryError, RuntimeError) as err:
            # torch.OutOfMemoryError is a RuntimeError, as is MPS's plain "out of memory".
            if isinstance(err, RuntimeError) and "out of memory" not in str(err).lower():
                raise
            model = config.model
            raise UserError(
                f"Out of memory on {device} ({first_line(err)}). Lower Model.frame_batch_size (now "
                f"{model['frame_batch_size']}) and Model.decode_chunk_size (now {model['decode_chunk_size']}), turn "
                "on model offload with Model.cpu_offload=true, or smooth long videos in video windows with "
                "Model.video_window=8."
            ) from err
        lap("pipeline")
        log("Writing videos ...")
        files = write_outputs(folder, plan, result)
        lap("write_outputs")
        seconds["total"] = time.perf_counter() - started
        write_json(folder / "stats.json", run_stats(plan, pipe, result, calls, seconds, files, device, dtype))
    except BaseException as err:
        write_text(folder / "error.txt", "".join(traceback.format_exception(err)))
        err.run_folder = folder = publish_run_folder(folder)
        log(f"The run failed; details in {folder / 'error.txt'}")
        raise
    folder = publish_run_folder(folder)
    log(f"Done in {seconds['total']:.1f} s: {folder / 'video_by_bivdiff.mp4'}")
    log(f"Compare: {folder / 'comparison.mp4'}   Stats: {folder / 'stats.json'}")
    if config.tiny:
        log(TINY_NOTE)
    return folder


def run_stats(plan: Plan, pipe, result, calls, seconds, files, device, dtype) -> dict:
    from bivdiff.profiling import peak_memory, stage_summary

    config, model = plan.config, plan.config.model
    stage_log = list(getattr(pipe, "stage_log", []) or [])
    video = dict(frames=len(result.frames[0]), width=model["width"], height=model["height"], fps=plan.fps)
    video.update(frame_stride=model["frame_rate"], source=str(plan.source_path), source_fps=plan.source.fps)
    models = {key: resolved.location for key, resolved in plan.models.items()}
    return dict(
        config=config.name, task=plan.task.title, idm=config.idm, vdm=config.vdm, tiny=config.tiny,
        note=TINY_NOTE if config.tiny else None, overrides=list(config.overrides), device=str(device),
        dtype=str(dtype).removeprefix("torch."), video=video, models=models or "tiny random weights",
        seconds=seconds, stages=stage_summary(stage_log, calls), unet_calls=calls,
        unet_calls_total=sum(sum(c.values()) for c in calls.values()),
        peak_memory=peak_memory(stage_log, device.type), files=files,
    )
