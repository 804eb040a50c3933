"""Run configs in the original BIVDiff layout (sections VDM, IDM, MixedInversion, Model): loading a YAML file,
merging dotted command-line overrides as Hydra does (`Model.num_inference_steps=20`), filling in defaults and
checking every key and value before any model is loaded.

Layers, later ones winning: built-in defaults < the YAML file < the `--tiny` defaults < command-line overrides.
Original config files load unchanged (their `hydra:` section is accepted and ignored).
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bivdiff.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------
# Schema: every key a section may hold, with its default and kind. Kinds drive override parsing: "str" and
# "path" values are taken verbatim from the command line (a prompt may contain ':' or ','), the others are
# parsed as YAML scalars or lists.


@dataclass(frozen=True)
class Key:
    default: Any
    kind: str  # "str", "path", "int", "float", "bool", "list", "any"


# The original's POS_PROMPT and NEG_PROMPT for ControlNet and InstructPix2Pix (models/*/infer.py), verbatim,
# typo included: they are the prompts the published results were made with.
QUALITY_SUFFIX = (
    " ,best quality, extremely detailed, HD, ultra-realistic, 8K, HQ, masterpiece, trending on artstation, art, smooth"
)
QUALITY_NEGATIVE = (
    "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer difits, cropped, worst quality, "
    "low quality, deformed body, bloated, ugly, unrealistic"
)

IDMS = (
    "ControlNet",
    "T2IAdapter",
    "InstructPix2Pix",
    "Prompt2Prompt",
    "StableDiffusionInpainting",
    "StableDiffusionOutpainting",
)
VDMS = ("VidRD", "ZeroScope")
SCHEDULERS = ("default", "DDIM", "PNDM", "EulerAncestral", "Euler", "DPMSolverMultistep", "UniPC", "LMS")
CONDITIONS = {"ControlNet": ("depth_midas", "canny", "openpose"), "T2IAdapter": ("depth_midas", "canny")}
DTYPES = ("auto", "fp16", "bf16", "fp32")
RESIZE_MODES = ("crop", "pad", "resize")

MODEL_KEYS = {
    "idm": Key(None, "str"),
    "vdm": Key(None, "str"),
    "idm_prompt": Key("", "str"),
    "vdm_prompt": Key("", "str"),
    "video_path": Key(None, "path"),
    "output_path": Key("./outputs/", "path"),
    "video_length": Key(8, "int"),
    "width": Key(512, "int"),
    "height": Key(512, "int"),
    "frame_rate": Key(4, "int"),
    "frame_stride": Key(None, "int"),
    "start_frame": Key(0, "int"),
    "resize_mode": Key("crop", "str"),
    "seed": Key(42, "int"),
    "guidance_scale": Key(7.5, "float"),
    "num_inference_steps": Key(50, "int"),
    "frame_batch_size": Key(8, "int"),
    "decode_chunk_size": Key(8, "int"),
    "device": Key("auto", "str"),
    "dtype": Key("auto", "str"),
    "cpu_offload": Key(False, "bool"),
    "video_window": Key(None, "int"),
    "video_window_overlap": Key(4, "int"),
}


def _idm_keys(mixing_ratio: float, quality_prompts: bool, scheduler: str = "default", **extra: Key) -> dict:
    keys = {
        "mixing_ratio": Key(mixing_ratio, "float"),
        "prompt_suffix": Key(QUALITY_SUFFIX if quality_prompts else "", "str"),
        "negative_prompt": Key(QUALITY_NEGATIVE if quality_prompts else "", "str"),
        "scheduler": Key(scheduler, "str"),
    }
    keys.update(extra)
    return keys


_CONTROL_KEYS = dict(
    condition_video=Key(None, "path"),
    conditioning_scale=Key(1.0, "float"),
    canny_low_threshold=Key(100, "float"),
    canny_high_threshold=Key(200, "float"),
    pretrained_model_path=Key(None, "path"),
)
_INPAINT_KEYS = dict(paste_back=Key(False, "bool"), pretrained_model_path=Key(None, "path"))

IDM_KEYS = {
    "ControlNet": _idm_keys(1.0, True, condition=Key("canny", "str"), **_CONTROL_KEYS),
    "T2IAdapter": _idm_keys(1.0, False, "DDIM", condition=Key("canny", "str"), **_CONTROL_KEYS),
    "InstructPix2Pix": _idm_keys(
        1.0, True, image_guidance_scale=Key(1.5, "float"), pretrained_model_path=Key(None, "path")
    ),
    "Prompt2Prompt": _idm_keys(
        0.25,
        False,
        "DDIM",
        controller_type=Key("AttentionRefine", "str"),
        prompts=Key(None, "list"),
        local_blend_words=Key([], "list"),
        cross_replace_steps=Key(0.4, "float"),
        self_replace_steps=Key(0.4, "float"),
        local_blend_threshold=Key(0.3, "float"),
    ),
    "StableDiffusionInpainting": _idm_keys(0.1, False, video_mask_path=Key(None, "path"), **_INPAINT_KEYS),
    "StableDiffusionOutpainting": _idm_keys(0.1, False, mask_type=Key("horizontal", "str"), **_INPAINT_KEYS),
}

VDM_KEYS = {
    "VidRD": {
        "diffusers_path": Key("./checkpoints/VidRD/diffusers", "path"),
        "_target_": Key("models.ReuseAndDiffuse.model.SDVideoModel", "str"),
        "pretrained_model_path": Key("./checkpoints/stable-diffusion-2-1-base/", "path"),
        "ckpt_path": Key("./checkpoints/VidRD/ModelT2V.pth", "path"),
        "guidance_scale": Key(7.5, "float"),
        "num_inference_steps": Key(50, "int"),
        "resolution": Key(256, "int"),
        "add_temp_embed": Key(True, "bool"),
        "add_temp_conv": Key(True, "bool"),
    },
    "ZeroScope": {"ckpt_path": Key("./checkpoints/ZeroScope/zeroscope_v2_576w", "path")},
}

MIXED_INVERSION_KEYS = {
    "idm": Key("SD-v15", "str"),
    "pretrained_model_path": Key("./checkpoints/stable-diffusion-v1-5", "path"),
}

# Smaller defaults for `--tiny` (random weights on a CPU); command-line overrides still win.
TINY_DEFAULTS = {"Model": {"width": 64, "height": 64, "video_length": 4, "num_inference_steps": 4}}

# A section of the original files that only configured Hydra itself.
IGNORED_SECTIONS = ("hydra",)


def _schema() -> dict:
    """Nested dict of Keys, in the file layout."""
    return {
        "VDM": VDM_KEYS,
        "IDM": IDM_KEYS,
        "MixedInversion": MIXED_INVERSION_KEYS,
        "Model": MODEL_KEYS,
    }


def valid_keys() -> list[str]:
    """Every dotted key a config may set."""
    keys = []

    def walk(node: dict, prefix: str):
        for name, value in node.items():
            if isinstance(value, Key):
                keys.append(prefix + name)
            else:
                walk(value, f"{prefix}{name}.")

    walk(_schema(), "")
    return keys


# ----------------------------------------------------------------------------------------------------------
# The resolved config


@dataclass
class RunConfig:
    """A checked config: `data` holds all four sections, every key present."""

    name: str
    data: dict
    tiny: bool = False
    overrides: tuple[str, ...] = ()  # as given on the command line (already merged into `data`)

    @property
    def model(self) -> dict:
        return self.data["Model"]

    @property
    def idm(self) -> str:
        return self.model["idm"]

    @property
    def vdm(self) -> str:
        return self.model["vdm"]

    @property
    def idm_options(self) -> dict:
        return self.data["IDM"][self.idm]

    @property
    def vdm_options(self) -> dict:
        return self.data["VDM"][self.vdm]

    @property
    def mixed_inversion(self) -> dict:
        return self.data["MixedInversion"]

    @property
    def frame_stride(self) -> int:
        return self.model["frame_rate"]

    def get(self, dotted: str) -> Any:
        node = self.data
        for part in dotted.split("."):
            node = node[part]
        return node

    def rerun_command(self, path: str = "config.yaml") -> str:
        """The command that reruns this config from its resolved YAML: the `--tiny` defaults would otherwise be
        laid over the file again, so the command-line overrides are repeated."""
        import shlex

        words = ["bivdiff", "run", *(["--tiny"] if self.tiny else []), "--config", path, *self.overrides]
        return " ".join(shlex.quote(w) for w in words)

    def to_yaml(self) -> str:
        """The resolved config as YAML; `bivdiff run --config` takes it back."""
        import yaml

        # Wide lines: the long quality prompts stay on one line each, as in the shipped configs.
        return yaml.safe_dump(self.data, sort_keys=False, width=10_000, allow_unicode=True)


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    tiny: bool = False,
    name: str | None = None,
) -> RunConfig:
    """Load a YAML config, apply the `--tiny` defaults and the `key=value` overrides, fill in defaults, check it.

    Raises ConfigError naming the first unknown key (with the nearest valid ones) or listing every bad value.
    """
    path = Path(path)
    file_layer = _read_yaml(path)
    _check_keys(file_layer, f"the config file {path}")
    override_layer = parse_overrides(overrides)
    _check_keys(override_layer, "the command-line overrides")

    layers = [_normalise_stride(file_layer, str(path))]
    if tiny:
        layers.append(copy.deepcopy(TINY_DEFAULTS))
    layers.append(_normalise_stride(override_layer, "the command-line overrides"))
    merged: dict = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    merged = {k: v for k, v in merged.items() if k not in IGNORED_SECTIONS}

    idm, vdm = _chosen_models(merged, path)
    data = deep_merge(_defaults(idm, vdm), merged)
    _normalise_values(data)
    config = RunConfig(name=name or path.stem, data=data, tiny=tiny, overrides=tuple(overrides))
    validate(config)
    return config


def _read_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not path.is_file():
        raise ConfigError(f"No config file at {path}: give the path of a YAML file, or --config-name NAME.")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OmegaConfBaseException, OSError, ValueError) as err:
        raise ConfigError(f"Cannot read the config file {path}: {err}") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"The config file {path} must hold sections (VDM, IDM, MixedInversion, Model).")
    return loaded


def parse_overrides(overrides) -> dict:
    """`["Model.seed=1", "IDM.ControlNet.condition=canny"]` -> nested dict. Values of text keys are kept
    verbatim (quotes around them removed); the others are parsed as YAML (numbers, true/false, null, [lists])."""
    layer: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"Override {item!r} must be KEY=VALUE with a dotted key, e.g. Model.num_inference_steps=20."
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"Override {item!r} has no valid key before '=': e.g. Model.num_inference_steps=20.")
        value = _parse_value(raw, _kind_of(key))
        node = layer
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"Override {item!r} sets a key inside {part}, which another override set to a value."
                )
        node[parts[-1]] = value
    return layer


def _kind_of(dotted: str) -> str:
    node: Any = _schema()
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "any"
        node = node[part]
    return node.kind if isinstance(node, Key) else "any"


def _parse_value(raw: str, kind: str) -> Any:
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if kind in ("str", "path"):
        return None if text == "null" else raw
    if text == "":
        return ""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]
    except Exception:  # noqa: BLE001 - anything YAML cannot parse stays a string, and validation says what is wrong
        return raw


def deep_merge(base: dict, update: dict) -> dict:
    """A new dict: `update` laid over `base`, recursing into dicts present in both."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# ----------------------------------------------------------------------------------------------------------
# Unknown keys


def _check_keys(layer: dict, where: str) -> None:
    def walk(node: dict, schema: dict, prefix: str):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if not prefix and key in IGNORED_SECTIONS:
                continue
            if key not in schema:
                raise ConfigError(_unknown_key_message(dotted, where))
            expected = schema[key]
            if isinstance(expected, Key):
                continue
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{dotted} in {where} is a section, not a value: set keys inside it, e.g. "
                    f"{_first_leaf(dotted)}=..."
                )
            walk(value, expected, dotted + ".")

    if not isinstance(layer, dict):
        raise ConfigError(f"{where} must hold sections (VDM, IDM, MixedInversion, Model).")
    walk(layer, _schema(), "")


def _first_leaf(dotted: str) -> str:
    return next(k for k in valid_keys() if k.startswith(dotted + "."))


def _unknown_key_message(dotted: str, where: str) -> str:
    candidates = valid_keys()
    sections = sorted({k.rsplit(".", 1)[0] for k in candidates} | {"VDM", "IDM", "MixedInversion", "Model"})
    near = difflib.get_close_matches(dotted, candidates + sections, n=3, cutoff=0.6)
    # The same key name in another section, e.g. Model.mixing_ratio -> IDM.ControlNet.mixing_ratio.
    last = dotted.rsplit(".", 1)[-1]
    near += [k for k in candidates if k.rsplit(".", 1)[-1] == last and k not in near][:3]
    parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    siblings = [k for k in candidates if parent and k.startswith(parent + ".") and k.count(".") == dotted.count(".")]
    message = f"Unknown config key {dotted!r} in {where}."
    if near:
        message += f" Did you mean: {', '.join(near)}?"
    elif siblings:
        message += f" Valid keys in {parent}: {', '.join(k.rsplit('.', 1)[-1] for k in siblings)}."
    else:
        message += " Sections are VDM, IDM, MixedInversion and Model."
    return message


# ----------------------------------------------------------------------------------------------------------
# Defaults and normalisation


def _normalise_stride(layer: dict, where: str) -> dict:
    """`frame_stride` is another name for the original's `frame_rate` (a frame stride): keep `frame_rate`."""
    model = layer.get("Model")
    if not isinstance(model, dict) or model.get("frame_stride") is None:
        return layer
    layer = copy.deepcopy(layer)
    stride = layer["Model"].pop("frame_stride")
    rate = layer["Model"].get("frame_rate")
    if rate is not None and rate != stride:
        raise ConfigError(
            f"Model.frame_rate={rate} and Model.frame_stride={stride} in {where} disagree: both name the frame "
            "stride (the original called it frame_rate). Set only one."
        )
    layer["Model"]["frame_rate"] = stride
    return layer


def _chosen_models(merged: dict, path: Path) -> tuple[str, str]:
    model = merged.get("Model") or {}
    idm, vdm = model.get("idm"), model.get("vdm")
    if idm not in IDMS:
        raise ConfigError(
            f"Model.idm={idm!r} in {path} is not an image model bivdiff knows: use one of {', '.join(IDMS)}."
        )
    if vdm not in VDMS:
        raise ConfigError(
            f"Model.vdm={vdm!r} in {path} is not a video model bivdiff knows: use one of {', '.join(VDMS)}."
        )
    return idm, vdm


def _defaults(idm: str, vdm: str) -> dict:
    def values(keys: dict) -> dict:
        return {name: copy.deepcopy(key.default) for name, key in keys.items()}

    return {
        "VDM": {vdm: values(VDM_KEYS[vdm])},
        "IDM": {idm: values(IDM_KEYS[idm])},
        "MixedInversion": values(MIXED_INVERSION_KEYS),
        "Model": values(MODEL_KEYS),
    }


def _normalise_values(data: dict) -> None:
    """Empty YAML values (`idm_prompt:`) mean empty text; the stride is kept under both names."""
    model = data["Model"]
    for key in ("idm_prompt", "vdm_prompt"):
        if model[key] is None:
            model[key] = ""
    for section in data["IDM"].values():
        for key in ("prompt_suffix", "negative_prompt"):
            if key in section and section[key] is None:
                section[key] = ""
        if "local_blend_words" in section and section["local_blend_words"] is None:
            section["local_blend_words"] = []
    model["frame_stride"] = model["frame_rate"]


# ----------------------------------------------------------------------------------------------------------
# Values


def validate(config: RunConfig) -> None:
    """Check every value the run will use; raise one ConfigError listing all problems with their fixes."""
    problems: list[str] = []
    _check_model(config.model, problems)
    _check_idm(config, problems)
    _check_paths(config, problems)
    if config.mixed_inversion["idm"] != "SD-v15":
        problems.append(
            f"MixedInversion.idm={config.mixed_inversion['idm']!r}: only 'SD-v15' (Stable Diffusion 1.5) is supported."
        )
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"The config {config.name} has {len(problems)} problem(s):\n{lines}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(section: dict, prefix: str, key: str, problems: list[str], minimum: int = 1) -> bool:
    value = section[key]
    if not _is_int(value) or value < minimum:
        problems.append(f"{prefix}.{key}={value!r} must be a whole number >= {minimum}.")
        return False
    return True


def _number_in(section: dict, prefix: str, key: str, problems: list[str], low=None, high=None, hint="") -> None:
    value = section[key]
    bad = not _is_number(value) or (low is not None and value < low) or (high is not None and value > high)
    if bad:
        bounds = f" in [{low}, {high}]" if high is not None else (f" >= {low}" if low is not None else "")
        problems.append(f"{prefix}.{key}={value!r} must be a number{bounds}.{hint}")


def _one_of(section: dict, prefix: str, key: str, choices, problems: list[str], hint: str = "") -> None:
    value = section[key]
    if value not in choices:
        problems.append(f"{prefix}.{key}={value!r} must be one of: {', '.join(map(str, choices))}.{hint}")


def _text(section: dict, prefix: str, key: str, problems: list[str], required: str = "") -> None:
    value = section[key]
    if not isinstance(value, str):
        problems.append(f"{prefix}.{key}={value!r} must be text (quote it in YAML).")
    elif required and not value.strip():
        problems.append(f"{prefix}.{key} is empty: {required}")


def _check_model(model: dict, problems: list[str]) -> None:
    for key in ("video_length", "frame_rate", "num_inference_steps", "frame_batch_size", "decode_chunk_size"):
        _positive_int(model, "Model", key, problems)
    _positive_int(model, "Model", "start_frame", problems, minimum=0)
    for key in ("width", "height"):
        if _positive_int(model, "Model", key, problems, minimum=8) and model[key] % 8:
            value = model[key]
            problems.append(
                f"Model.{key}={value} is not a multiple of 8 (the VAE works on 8x8 pixel blocks): "
                f"use {value // 8 * 8} or {value // 8 * 8 + 8}."
            )
    if not _is_int(model["seed"]):
        problems.append(f"Model.seed={model['seed']!r} must be a whole number.")
    _number_in(model, "Model", "guidance_scale", problems, low=0)
    _one_of(model, "Model", "resize_mode", RESIZE_MODES, problems)
    _one_of(model, "Model", "dtype", DTYPES, problems)
    device = model["device"]
    if not isinstance(device, str) or not (
        device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        problems.append(f"Model.device={device!r} must be auto, cpu, cuda, cuda:N or mps.")
    if not isinstance(model["cpu_offload"], bool):
        problems.append(f"Model.cpu_offload={model['cpu_offload']!r} must be true or false.")
    if model["video_window"] is not None and _positive_int(model, "Model", "video_window", problems, minimum=2):
        overlap = model["video_window_overlap"]
        if not _is_int(overlap) or not 0 <= overlap < model["video_window"]:
            problems.append(
                f"Model.video_window_overlap={overlap!r} must be a whole number from 0 to "
                f"Model.video_window - 1 ({model['video_window'] - 1})."
            )
    for key in ("idm_prompt", "vdm_prompt"):
        _text(model, "Model", key, problems)


def _check_idm(config: RunConfig, problems: list[str]) -> None:
    idm, options, prefix = config.idm, config.idm_options, f"IDM.{config.idm}"
    _number_in(options, prefix, "mixing_ratio", problems, 0.0, 1.0, " 1 = image-model inversion only, 0 = video only.")
    _one_of(options, prefix, "scheduler", SCHEDULERS, problems)
    for key in ("prompt_suffix", "negative_prompt"):
        _text(options, prefix, key, problems)
    if idm in CONDITIONS:
        _one_of(options, prefix, "condition", CONDITIONS[idm], problems)
        _number_in(options, prefix, "conditioning_scale", problems, low=0)
        _number_in(options, prefix, "canny_low_threshold", problems, low=0)
        _number_in(options, prefix, "canny_high_threshold", problems, low=0)
        _text(config.model, "Model", "idm_prompt", problems, required=f"{idm} needs a prompt describing the frames.")
    if idm == "InstructPix2Pix":
        _number_in(options, prefix, "image_guidance_scale", problems, low=0)
        _text(config.model, "Model", "idm_prompt", problems, required="InstructPix2Pix needs an editing instruction.")
    if idm == "Prompt2Prompt":
        _check_prompt2prompt(options, prefix, problems)
    if idm == "StableDiffusionOutpainting":
        _one_of(options, prefix, "mask_type", ("horizontal", "vertical"), problems)
    if idm in ("StableDiffusionInpainting", "StableDiffusionOutpainting") and not isinstance(
        options["paste_back"], bool
    ):
        problems.append(f"{prefix}.paste_back={options['paste_back']!r} must be true or false.")


def _check_prompt2prompt(options: dict, prefix: str, problems: list[str]) -> None:
    _one_of(options, prefix, "controller_type", ("AttentionReplace", "AttentionRefine"), problems)
    prompts = options["prompts"]
    if not (
        isinstance(prompts, list) and len(prompts) == 2 and all(isinstance(p, str) and p.strip() for p in prompts)
    ):
        problems.append(
            f"{prefix}.prompts={prompts!r} must be two non-empty prompts, [source, edited], e.g. "
            f"{prefix}.prompts='[A car is moving on the road, A white car is moving on the road]'."
        )
    words = options["local_blend_words"]
    if not isinstance(words, list):
        problems.append(f"{prefix}.local_blend_words={words!r} must be a list, e.g. [car, car] or [].")
    for key in ("cross_replace_steps", "self_replace_steps", "local_blend_threshold"):
        _number_in(options, prefix, key, problems, 0.0, 1.0)


def _check_paths(config: RunConfig, problems: list[str]) -> None:
    """Input files must exist now, not after minutes of model loading."""
    inputs = [("Model.video_path", config.model["video_path"])]
    for key in ("condition_video", "video_mask_path"):
        if key in config.idm_options:
            inputs.append((f"IDM.{config.idm}.{key}", config.idm_options[key]))
    for dotted, value in inputs:
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{dotted}={value!r} must be a path (or null).")
        elif not Path(value).expanduser().exists():
            problems.append(
                f"{dotted}: no file or folder at {value} (from {Path.cwd()}): give an MP4, a GIF or a folder of "
                f"images, or null for the clip shipped with bivdiff."
            )
