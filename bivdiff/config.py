"""Run configs in the original BIVDiff layout (sections VDM, IDM, MixedInversion, Model; `hydra:` is ignored) as
OmegaConf structured configs: the dataclasses below are the schema (keys, types, defaults, ranges). OmegaConf merges
defaults < the YAML file < the `--tiny` defaults < `key=value` overrides in struct mode, refusing unknown keys and
converting types; this module adds the messages and the range checks, all run before any model loads.

Overrides are parsed here, not with Hydra's grammar, which rejects unquoted commas: a prompt may hold commas and
colons unquoted (`"Model.idm_prompt=A fox: running, fast"`), as the original's users typed them.
"""

import contextlib
import difflib
import functools
import math
import re
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import List, Optional

import yaml

from bivdiff.errors import ConfigError

# The original's POS_PROMPT and NEG_PROMPT for ControlNet and InstructPix2Pix (models/*/infer.py), verbatim,
# typo included: they are the prompts the published results were made with.
QUALITY_SUFFIX = (" ,best quality, extremely detailed, HD, ultra-realistic, 8K, HQ, masterpiece, "
                  "trending on artstation, art, smooth")
QUALITY_NEGATIVE = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer difits, cropped, "
                    "worst quality, low quality, deformed body, bloated, ugly, unrealistic")
SCHEDULERS = ("default", "DDIM", "PNDM", "EulerAncestral", "Euler", "DPMSolverMultistep", "UniPC", "LMS")
TINY_DEFAULTS = {"Model": {"width": 64, "height": 64, "video_length": 4, "num_inference_steps": 4}}


def bounded(default, low, high=None, hint=""):
    return field(default=default, metadata={"low": low, "high": high, "hint": hint})


def one_of(default, *choices):
    return field(default=default, metadata={"choices": choices})


mixing = functools.partial(bounded, low=0.0, high=1.0, hint=" 1 = image-model inversion only, 0 = video only.")


@dataclass
class ModelOptions:
    idm: Optional[str] = None
    vdm: Optional[str] = None
    idm_prompt: Optional[str] = ""
    vdm_prompt: Optional[str] = ""
    video_path: Optional[str] = None
    output_path: str = "./outputs/"
    video_length: int = bounded(8, 1)
    width: int = bounded(512, 8)
    height: int = bounded(512, 8)
    frame_rate: int = bounded(4, 1)  # a frame stride (the original's name); alias frame_stride
    frame_stride: Optional[int] = None
    start_frame: int = bounded(0, 0)
    resize_mode: str = one_of("crop", "crop", "pad", "resize")
    seed: int = 42
    guidance_scale: float = bounded(7.5, 0)
    num_inference_steps: int = bounded(50, 1)
    frame_batch_size: int = bounded(8, 1)
    cross_frame_attention: bool = False  # stage 1 reads each video's first frame (README)
    decode_chunk_size: int = bounded(8, 1)
    device: str = "auto"
    dtype: str = one_of("auto", "auto", "fp16", "bf16", "fp32")
    cpu_offload: bool = False
    video_window: Optional[int] = bounded(None, 2)
    video_window_overlap: int = bounded(4, 0)
    video_freeu: Optional[List[float]] = None  # FreeU's [s1, s2, b1, b2] on the video UNet (README, Python API)


@dataclass
class IDMOptions:
    mixing_ratio: float = mixing(1.0)
    prompt_suffix: Optional[str] = ""
    negative_prompt: Optional[str] = ""
    scheduler: str = one_of("default", *SCHEDULERS)


@dataclass
class ConditionOptions(IDMOptions):
    condition: str = one_of("canny", "depth_midas", "canny")
    condition_video: Optional[str] = None
    conditioning_scale: float = bounded(1.0, 0)
    canny_low_threshold: float = bounded(100.0, 0)
    canny_high_threshold: float = bounded(200.0, 0)
    pretrained_model_path: Optional[str] = None


@dataclass
class ControlNetOptions(ConditionOptions):
    prompt_suffix: Optional[str] = QUALITY_SUFFIX
    negative_prompt: Optional[str] = QUALITY_NEGATIVE
    condition: str = one_of("canny", "depth_midas", "canny", "openpose")
    # diffusers' ControlNet call arguments: the fractions of stage 1's steps the ControlNet acts in, and guess mode.
    control_guidance_start: float = bounded(0.0, 0.0, 1.0)
    control_guidance_end: float = bounded(1.0, 0.0, 1.0)
    guess_mode: bool = False
    control_smoothing: bool = False  # the ControlNet also guides smoothing (AnimateDiff only; README, Differences)


@dataclass
class T2IAdapterOptions(ConditionOptions):
    scheduler: str = one_of("DDIM", *SCHEDULERS)


@dataclass
class InstructPix2PixOptions(IDMOptions):
    prompt_suffix: Optional[str] = QUALITY_SUFFIX
    negative_prompt: Optional[str] = QUALITY_NEGATIVE
    image_guidance_scale: float = bounded(1.5, 0)
    pretrained_model_path: Optional[str] = None


@dataclass
class Prompt2PromptOptions(IDMOptions):
    mixing_ratio: float = mixing(0.25)
    scheduler: str = one_of("DDIM", *SCHEDULERS)
    # scheduler: DDIM retraces the source's DDIM inversion; the original's PNDM ("default" or "PNDM") edits with it
    controller_type: str = one_of("AttentionRefine", "AttentionReplace", "AttentionRefine", "AttentionReweight")
    prompts: Optional[List[str]] = None
    local_blend_words: Optional[List[str]] = field(default_factory=list)
    cross_replace_steps: float = bounded(0.4, 0.0, 1.0)
    self_replace_steps: float = bounded(0.4, 0.0, 1.0)
    local_blend_threshold: float = bounded(0.3, 0.0, 1.0)
    reweight_words: List[str] = field(default_factory=list)  # words of the edited prompt, each with its strength
    reweight_strengths: List[float] = field(default_factory=list)
    upcast_editing: bool = False  # the original edited in fp32


@dataclass
class InpaintingOptions(IDMOptions):
    mixing_ratio: float = mixing(0.1)
    video_mask_path: Optional[str] = None
    paste_back: bool = False
    pretrained_model_path: Optional[str] = None


@dataclass
class OutpaintingOptions(IDMOptions):
    mixing_ratio: float = mixing(0.1)
    mask_type: str = one_of("horizontal", "horizontal", "vertical")
    paste_back: bool = False
    pretrained_model_path: Optional[str] = None


@dataclass
class VidRDOptions:
    diffusers_path: str = "./checkpoints/VidRD/diffusers"
    _target_: str = "models.ReuseAndDiffuse.model.SDVideoModel"
    pretrained_model_path: str = "./checkpoints/stable-diffusion-2-1-base/"
    ckpt_path: str = "./checkpoints/VidRD/ModelT2V.pth"
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    resolution: int = 256
    add_temp_embed: bool = True
    add_temp_conv: bool = True


@dataclass
class ZeroScopeOptions:
    ckpt_path: str = "./checkpoints/ZeroScope/zeroscope_v2_576w"


@dataclass
class ModelScopeOptions:
    ckpt_path: str = "./checkpoints/ModelScope/text-to-video-ms-1.7b"


@dataclass
class AnimateDiffOptions:
    motion_adapter_path: str = "./checkpoints/AnimateDiff/animatediff-motion-adapter-v1-5-3"
    pretrained_model_path: Optional[str] = None  # the SD-1.5-family base; None: the image model's own


@dataclass
class MixedInversionOptions:
    idm: str = one_of("SD-v15", "SD-v15")
    pretrained_model_path: str = "./checkpoints/stable-diffusion-v1-5"
    # The pipelines' call arguments of the same names; True is the original's behaviour (README, Differences).
    pool_norms_over_frames: bool = True
    reencode_frames: bool = True
    strength: float = bounded(1.0, 0.0, 1.0, " 1 = the full inversion; lower keeps more of the image model's frames.")


IDM_SCHEMAS = {"ControlNet": ControlNetOptions, "T2IAdapter": T2IAdapterOptions,
               "InstructPix2Pix": InstructPix2PixOptions, "Prompt2Prompt": Prompt2PromptOptions,
               "StableDiffusionInpainting": InpaintingOptions, "StableDiffusionOutpainting": OutpaintingOptions}
VDM_SCHEMAS = {"VidRD": VidRDOptions, "ZeroScope": ZeroScopeOptions, "AnimateDiff": AnimateDiffOptions,
               "ModelScope": ModelScopeOptions}
SECTIONS = {"VDM": VDM_SCHEMAS, "IDM": IDM_SCHEMAS, "MixedInversion": MixedInversionOptions, "Model": ModelOptions}


@functools.cache
def _schema():
    """The defaults of every section, refusing unknown keys; merges copy it, nothing changes it."""
    from omegaconf import OmegaConf

    return OmegaConf.create(SECTIONS, flags={"struct": True})


def valid_keys() -> list[str]:
    """Every dotted key a config may set."""
    nested = {f"{section}.{name}": cls for section in ("VDM", "IDM") for name, cls in SECTIONS[section].items()}
    classes = {**nested, "MixedInversion": MixedInversionOptions, "Model": ModelOptions}
    return [f"{section}.{f.name}" for section, cls in classes.items() for f in fields(cls)]


@dataclass
class RunConfig:
    """A checked config: `data` holds the four sections (only the chosen IDM and VDM), every key present."""

    name: str
    data: dict
    tiny: bool = False
    overrides: tuple[str, ...] = ()  # as given on the command line (already merged into `data`)

    def __post_init__(self):
        self.model, self.mixed_inversion = self.data["Model"], self.data["MixedInversion"]
        self.idm, self.vdm = self.model["idm"], self.model["vdm"]
        self.idm_options, self.vdm_options = self.data["IDM"][self.idm], self.data["VDM"][self.vdm]

    def rerun_command(self, path: str = "config.yaml") -> str:
        """The command that reruns this config from its resolved YAML: the `--tiny` defaults would otherwise be
        laid over the file again, so the command-line overrides are repeated."""
        words = ["bivdiff", "run", *(["--tiny"] if self.tiny else []), "--config", path, *self.overrides]
        return " ".join(shlex.quote(w) for w in words)

    def to_yaml(self) -> str:
        """The resolved config as YAML; `bivdiff run --config` takes it back."""
        # Wide lines: the long quality prompts stay on one line each, as in the shipped configs.
        return yaml.safe_dump(self.data, sort_keys=False, width=10_000, allow_unicode=True)


def load_config(path: str | Path, overrides=(), tiny: bool = False, name: str | None = None) -> RunConfig:
    """Load a YAML config, lay the `--tiny` defaults and the `key=value` overrides over it, check it: a ConfigError
    names an unknown key (with the nearest valid ones), or lists every bad value."""
    from omegaconf import DictConfig, OmegaConf

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"No config file at {path}: give the path of a YAML file, or --config-name NAME.")
    try:
        file = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - YAML, OS and OmegaConf errors alike mean an unreadable file
        raise ConfigError(f"Cannot read the config file {path}: {err}") from err
    if not isinstance(file, DictConfig):
        raise ConfigError(f"The config file {path} must hold sections (VDM, IDM, MixedInversion, Model).")
    file.pop("hydra", None)  # the original files' settings of Hydra itself
    merged = _merge(_schema(), file, f"the config file {path}")
    merged = _merge(merged, OmegaConf.create(TINY_DEFAULTS if tiny else {}), "the --tiny defaults")
    merged = _merge(merged, parse_overrides(overrides), "the command-line overrides")
    data = OmegaConf.to_container(merged)
    model = data["Model"]
    for key, known, kind in (("idm", IDM_SCHEMAS, "an image"), ("vdm", VDM_SCHEMAS, "a video")):
        if model[key] not in known:
            raise ConfigError(f"Model.{key}={model[key]!r} in {path} is not {kind} model bivdiff knows: "
                              f"use one of {', '.join(known)}.")
        data[key.upper()] = {model[key]: data[key.upper()][model[key]]}  # only the chosen model's section
    for options in (model, data["IDM"][model["idm"]]):  # an empty YAML value means empty text (or no words)
        blank = dict(idm_prompt="", vdm_prompt="", prompt_suffix="", negative_prompt="", local_blend_words=[])
        options.update({key: value for key, value in blank.items() if key in options and options[key] is None})
    model["frame_stride"] = model["frame_rate"]
    config = RunConfig(name=name or path.stem, data=data, tiny=tiny, overrides=tuple(overrides))
    validate(config)
    return config


def parse_overrides(overrides):
    """`["Model.seed=1", "IDM.ControlNet.condition=canny"]` as an OmegaConf layer. Text values are kept verbatim
    (surrounding quotes removed); a value for a list, or `null`, is parsed as YAML; the schema converts the rest."""
    from omegaconf import OmegaConf, StringNode
    from omegaconf._impl import select_node

    layer = OmegaConf.create()
    for item in overrides:
        key, equals, raw = item.partition("=")
        key, text = key.strip(), raw.strip()
        if not (equals and all(key.split("."))):
            raise ConfigError(f"Override {item!r} must be KEY=VALUE with a dotted key, "
                              "e.g. Model.num_inference_steps=20.")
        node = select_node(_schema(), key)  # its type says whether `[...]` is a list or text; None: an unknown key
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        value = text[1:-1] if quoted else None if text == "null" else raw
        if not quoted and text.startswith("[") and not isinstance(node, StringNode):
            with contextlib.suppress(yaml.YAMLError):  # unparsable: the schema then says what is wrong
                value = yaml.safe_load(text)
        try:
            OmegaConf.update(layer, key, value, force_add=True)
        except Exception as err:  # noqa: BLE001 - e.g. a key set both as a value and as a section
            raise ConfigError(f"Override {item!r} conflicts with an earlier override: {err}") from err
    return layer


def _merge(base, layer, where: str):
    """`layer` over `base`. `Model.frame_stride` is another name for the original's `Model.frame_rate` (a frame
    stride): it is set as `frame_rate`. An unknown key is named with the nearest valid ones."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    model = layer.get("Model")
    stride = model.pop("frame_stride", None) if isinstance(model, DictConfig) else None
    if stride is not None:
        rate = model.get("frame_rate")
        if rate is not None and str(rate) != str(stride):
            raise ConfigError(f"Model.frame_rate={rate} and Model.frame_stride={stride} in {where} disagree: both "
                              "name the frame stride (the original called it frame_rate). Set only one.")
        model["frame_rate"] = stride
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as err:
        keys, dotted = valid_keys(), err.full_key
        sections = sorted({k.rsplit(".", 1)[0] for k in keys} | set(SECTIONS))
        near = difflib.get_close_matches(dotted, keys + sections, n=3, cutoff=0.6)
        # The same key name in another section, e.g. Model.mixing_ratio -> IDM.ControlNet.mixing_ratio.
        near += [k for k in keys if k.rsplit(".", 1)[-1] == dotted.rsplit(".", 1)[-1] and k not in near][:3]
        hint = f" Did you mean: {', '.join(near)}?" if near else " Sections: VDM, IDM, MixedInversion, Model."
        raise ConfigError(f"Unknown config key {dotted!r} in {where}.{hint}") from None
    except ValidationError as err:
        if err.full_key:
            reason = err.msg.splitlines()[0].rstrip(".")
            raise ConfigError(f"Bad value for {err.full_key} in {where}: {reason}.") from None
        raise ConfigError(f"{where} sets a section to a value: set keys inside it, e.g. Model.seed=1.") from None


def validate(config: RunConfig) -> None:
    """Check every value the run will use; raise one ConfigError listing all problems with their fixes."""
    model, options, prefix = config.model, config.idm_options, f"IDM.{config.idm}"
    problems = []
    for section, schema, values in (("Model", ModelOptions, model), (prefix, IDM_SCHEMAS[config.idm], options),
                                    ("MixedInversion", MixedInversionOptions, config.mixed_inversion)):
        for spec in fields(schema):  # the keys whose schema field declares choices or bounds
            meta, value, dotted = spec.metadata, values.get(spec.name), f"{section}.{spec.name}"
            if "choices" in meta and value not in meta["choices"]:
                problems.append(f"{dotted}={value!r} must be one of: {', '.join(meta['choices'])}.")
            elif "low" in meta and value is not None:  # an int or a float: the schema converted it
                low, high = meta["low"], meta["high"]
                if not (low <= value < math.inf and (high is None or value <= high)):  # NaN fails every comparison
                    kind = "a whole number" if isinstance(value, int) else "a number"
                    bounds = f" >= {low}" if high is None else f" in [{low}, {high}]"
                    problems.append(f"{dotted}={value!r} must be {kind}{bounds}.{meta['hint']}")
    for key in ("width", "height"):
        if model[key] >= 8 and model[key] % 8:
            low = model[key] // 8 * 8
            problems.append(f"Model.{key}={model[key]} is not a multiple of 8 (the VAE works on 8x8 pixel blocks): "
                            f"use {low} or {low + 8}.")
    if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", model["device"]):
        problems.append(f"Model.device={model['device']!r} must be auto, cpu, cuda, cuda:N or mps.")
    steps, strength = model["num_inference_steps"], config.mixed_inversion["strength"]
    # The pipelines' `strength_steps` rule, written out: importing it would load diffusers to check a config.
    if steps >= 1 and 0 <= strength <= 1 and int(steps * strength + 1e-9) < 1:
        problems.append(f"MixedInversion.strength={strength!r} keeps no step of Model.num_inference_steps={steps}: "
                        f"use at least {math.ceil(1e4 / steps) / 1e4:g}.")
    if model["cross_frame_attention"] and config.idm == "Prompt2Prompt":
        problems.append("Model.cross_frame_attention=true: Prompt2Prompt's attention editing owns stage 1's "
                        "self-attention; set it to false.")
    elif model["cross_frame_attention"] and model["frame_batch_size"] == 1 and model["video_length"] > 1:
        problems.append("Model.cross_frame_attention=true needs Model.frame_batch_size >= 2: every batch of frames "
                        "carries the video's first frame, which the others attend to.")
    window, overlap = model["video_window"], model["video_window_overlap"]
    if window is not None and window >= 2 and not overlap < window:
        problems.append(f"Model.video_window_overlap={overlap!r} must be a whole number from 0 to "
                        f"Model.video_window - 1 ({window - 1}).")
    start, end = options.get("control_guidance_start"), options.get("control_guidance_end")  # ControlNet's only
    if start is not None and not start < end:
        problems.append(f"{prefix}.control_guidance_start={start!r} must be below {prefix}.control_guidance_end="
                        f"{end!r}: they are the fractions of stage 1's steps between which the ControlNet acts.")
    if options.get("control_smoothing") and (config.vdm != "AnimateDiff" or options["guess_mode"]):
        problems.append(f"{prefix}.control_smoothing=true needs Model.vdm=AnimateDiff (the one video model that takes "
                        f"a ControlNet's residuals) and {prefix}.guess_mode=false.")
    freeu = model["video_freeu"]
    if freeu is not None and not (len(freeu) == 4 and all(0 <= factor < math.inf for factor in freeu)):
        problems.append(f"Model.video_freeu={freeu!r} must be FreeU's four factors [s1, s2, b1, b2], each >= 0, e.g. "
                        "[0.9,0.2,1.2,1.4] (the values FreeU's diffusers port gives ZeroScope), or null for none.")
    need = {"InstructPix2Pix": "an editing instruction"}.get(config.idm, "a prompt describing the frames")
    if config.idm in ("ControlNet", "T2IAdapter", "InstructPix2Pix") and not model["idm_prompt"].strip():
        problems.append(f"Model.idm_prompt is empty: {config.idm} needs {need}.")
    prompts = options.get("prompts")
    if "prompts" in options and not (prompts and len(prompts) == 2 and all(p.strip() for p in prompts)):
        problems.append(f"{prefix}.prompts={prompts!r} must be two non-empty prompts, [source, edited], e.g. "
                        f"{prefix}.prompts='[A car is moving on the road, A white car is moving on the road]'.")
    if len(options.get("reweight_words", [])) != len(options.get("reweight_strengths", [])):
        problems.append(f"{prefix}.reweight_words and {prefix}.reweight_strengths need one strength per word.")
    for section, values in (("Model", model), (prefix, options)):
        for key in ("video_path", "condition_video", "video_mask_path"):
            if values.get(key) is not None and not Path(values[key]).expanduser().exists():
                # Input files must exist now, not after minutes of model loading.
                problems.append(f"{section}.{key}: no file or folder at {values[key]} (from {Path.cwd()}): give an "
                                "MP4, a GIF or a folder of images, or null for the clip shipped with bivdiff.")
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"The config {config.name} has {len(problems)} problem(s):\n{lines}")
