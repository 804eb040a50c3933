"""Where each model of a run comes from: the original `checkpoints/` layout when it is there, else a Hugging Face
Hub id (each known id tried in order) through huggingface_hub: `snapshot_download` with the files the run needs
as `allow_patterns`, from the cache only (`local_files_only`) when offline, else fetching what is missing.

Everything a config needs is resolved before anything is loaded, so a missing model is reported once, together
with every other missing model of that config and how to get each, and nothing runs first.
"""

import os
from dataclasses import dataclass, replace
from pathlib import Path

from bivdiff import conditions
from bivdiff.errors import UserError

VIDRD_CONVERTER = "conversion_scripts/convert_vidrd_to_diffusers.py"
VIDRD_WEIGHTS_SOURCE = "the VidRD authors' download link in the README of github.com/anonymous0x233/ReuseAndDiffuse"
# A part of a model repo is a component folder ("" = the repo root) or, when its name has a dot, a single file.
# A folder holds a component when it has one file of each group; its kind is told by its name.
REQUIRED = {
    "model": (("config.json",), ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")),
    "scheduler": (("scheduler_config.json",),),
    "tokenizer": (("tokenizer_config.json", "vocab.json", "tokenizer.json"),),
}

_SD = "CreativeML OpenRAIL-M"
# The components a model gives a pipeline: name -> (subfolder, class name); the subfolders are the parts read.
_SD15 = {"vae": ("vae", "AutoencoderKL"), "text_encoder": ("text_encoder", "CLIPTextModel"),
         "tokenizer": ("tokenizer", "CLIPTokenizer"), "unet": ("unet", "UNet2DConditionModel")}
_UNET = {"unet": ("unet", "UNet2DConditionModel")}
_CONTROLNET, _ADAPTER = {"controlnet": ("", "ControlNetModel")}, {"adapter": ("", "T2IAdapter")}
_T2V = {"video_unet": ("unet", "UNet3DConditionModel"), "video_text_encoder": ("text_encoder", "CLIPTextModel"),
        "video_tokenizer": ("tokenizer", "CLIPTokenizer")}
_VIDRD = {"video_unet": ("video_unet", "VidRDUNet3DConditionModel"),
          "video_text_encoder": ("video_text_encoder", "CLIPTextModel"),
          "video_tokenizer": ("video_tokenizer", "CLIPTokenizer")}
# AnimateDiff's own base model: its UNet carries the motion modules, its CLIP encodes the video prompt.
_MOTION_BASE = {"motion_base": ("unet", "UNet2DConditionModel"), "video_text_encoder": _T2V["video_text_encoder"],
                "video_tokenizer": _T2V["video_tokenizer"]}
# key: (title, folder under the checkpoints root as in the original release, Hub ids tried in order (some original
# repos moved when their first owners took them down), licence, whether every part is on the Hub as safetensors,
# the components it gives).
CATALOGUE = {
    "sd15": ("Stable Diffusion 1.5", "stable-diffusion-v1-5",
             "stable-diffusion-v1-5/stable-diffusion-v1-5 runwayml/stable-diffusion-v1-5", _SD, True, _SD15),
    "controlnet-depth_midas": ("ControlNet v1.1 depth", "ControlNet/control_v11f1p_sd15_depth",
                               "lllyasviel/control_v11f1p_sd15_depth", "OpenRAIL", True, _CONTROLNET),
    "controlnet-canny": ("ControlNet v1.1 canny", "ControlNet/control_v11p_sd15_canny",
                         "lllyasviel/control_v11p_sd15_canny", "OpenRAIL", True, _CONTROLNET),
    "controlnet-openpose": ("ControlNet v1.1 openpose", "ControlNet/control_v11p_sd15_openpose",
                            "lllyasviel/control_v11p_sd15_openpose", "OpenRAIL", True, _CONTROLNET),
    "t2iadapter-depth_midas": ("T2I-Adapter depth (SD 1.5 v2)", "T2IAdapter/t2iadapter_depth_sd15v2",
                               "TencentARC/t2iadapter_depth_sd15v2", "Apache-2.0", False, _ADAPTER),
    "t2iadapter-canny": ("T2I-Adapter canny (SD 1.5 v2)", "T2IAdapter/t2iadapter_canny_sd15v2",
                         "TencentARC/t2iadapter_canny_sd15v2", "Apache-2.0", False, _ADAPTER),
    "instruct-pix2pix": ("InstructPix2Pix", "InstructPix2Pix/instruct-pix2pix", "timbrooks/instruct-pix2pix", "MIT",
                         True, _UNET),
    "sd-inpainting": ("Stable Diffusion Inpainting", "StableDiffusionInpainting/stable-diffusion-inpainting",
                      "stable-diffusion-v1-5/stable-diffusion-inpainting runwayml/stable-diffusion-inpainting", _SD,
                      True, _UNET),
    "zeroscope": ("ZeroScope v2 576w", "ZeroScope/zeroscope_v2_576w", "cerspense/zeroscope_v2_576w", "CC-BY-NC-4.0",
                  False, _T2V),
    "modelscope": ("ModelScope text-to-video 1.7B", "ModelScope/text-to-video-ms-1.7b",
                   "ali-vilab/text-to-video-ms-1.7b damo-vilab/text-to-video-ms-1.7b", "CC-BY-NC-4.0", False, _T2V),
    "animatediff": ("AnimateDiff motion adapter v1-5-3", "AnimateDiff/animatediff-motion-adapter-v1-5-3",
                    "guoyww/animatediff-motion-adapter-v1-5-3 guoyww/animatediff-motion-adapter-v1-5-2", "Apache-2.0",
                    True, {"motion_adapter": ("", "MotionAdapter")}),
    "animatediff-base": ("AnimateDiff's SD-1.5-family base model", "", "", _SD, True, _MOTION_BASE),
    "vidrd": ("VidRD (converted to diffusers)", "VidRD/diffusers", "",
              "the VidRD authors' terms (github.com/anonymous0x233/ReuseAndDiffuse)", False, _VIDRD),
    "annotators": ("controlnet_aux annotator weights", "Annotators", "lllyasviel/Annotators",
                   "see lllyasviel/Annotators", False, {}),
}
# Model.vdm -> (catalogue key, the VDM option naming its folder).
VIDEO_MODELS = {"ZeroScope": ("zeroscope", "ckpt_path"), "ModelScope": ("modelscope", "ckpt_path"),
                "AnimateDiff": ("animatediff", "motion_adapter_path"), "VidRD": ("vidrd", "diffusers_path")}

# Clip lengths a loaded model cannot tell by itself (ZeroScope has ModelScope's class and config), written into its
# config as `native_num_frames`, which the pipelines read to choose default video windows.
NATIVE_NUM_FRAMES = {"zeroscope": 24, "modelscope": 16}


@dataclass(frozen=True)
class ModelSpec:
    """A model a run needs: the parts it reads and its local folder (the rest comes from the catalogue)."""

    key: str
    parts: tuple[str, ...]
    local: Path
    how_to_get: str | None = None  # replaces the download instructions when the model is not on the Hub (VidRD)

    title = property(lambda self: CATALOGUE[self.key][0])
    hub_ids = property(lambda self: tuple(CATALOGUE[self.key][2].split()))
    licence = property(lambda self: CATALOGUE[self.key][3])
    safetensors = property(lambda self: CATALOGUE[self.key][4])
    components = property(lambda self: CATALOGUE[self.key][5])

    def patterns(self) -> tuple[list[str], list[str]]:
        """(allow, ignore) file patterns of the parts: for `hf download` and `snapshot_download` alike."""
        root = ["*.json", "*.safetensors" if self.safetensors else "diffusion_pytorch_model.*"]
        allow = []
        for part in self.parts:  # a file, a component's folder, or the repo root's config and weights
            allow += [part] if "." in part else [f"{part}/*"] if part else root
        ignore = ["*.fp16.*", "*non_ema*", "*.ckpt"] + (["*.bin"] if self.safetensors else [])
        return allow, ignore if any("." not in part for part in self.parts) else []


spec = ModelSpec


@dataclass(frozen=True)
class ResolvedModel:
    spec: ModelSpec
    location: str  # a local folder, or a Hub id read through the cache
    is_local: bool

    def describe(self) -> str:
        return f"{self.spec.title}: {self.location}" + ("" if self.is_local else " (Hugging Face Hub)")


def checkpoint_path(value: str | os.PathLike | None, root: Path, default: str) -> Path:
    """A model folder from a config value: relative paths starting with `checkpoints/` are under `root`
    (`--checkpoints`), other relative paths under the working directory; None gives `root / default`."""
    if value is None:
        return root / default
    path = Path(value).expanduser()
    if not path.is_absolute() and path.parts and path.parts[0] == "checkpoints":
        return root.joinpath(*path.parts[1:])
    return path


def parts_of(key: str, *extra: str) -> tuple[str, ...]:
    """The parts of a model repo a run reads: its components' folders, then `extra` parts."""
    return (*(subfolder for subfolder, _ in CATALOGUE[key][5].values()), *extra)


SD15_PARTS = parts_of("sd15", "scheduler", "model_index.json")  # the pipeline's from_pretrained reads the index


def model_specs(config, task, root: Path) -> list[ModelSpec]:
    """The models a run of `config` by `task` reads: SD-1.5, the video model (and AnimateDiff's own base), the image
    model's own (its UNet comes with its sampler) and the annotator weights a condition needs, each with its folder
    under the checkpoints `root`."""
    options, idm_options = config.vdm_options, config.idm_options
    video, option = VIDEO_MODELS[config.vdm]
    local = checkpoint_path(options[option], root, CATALOGUE[video][1])
    how = None
    if video == "vidrd":
        checkpoint = checkpoint_path(options["ckpt_path"], root, "VidRD/ModelT2V.pth")
        sd21 = checkpoint_path(options["pretrained_model_path"], root, "stable-diffusion-2-1-base")
        how = vidrd_instructions(checkpoint, sd21, local)
    sd15 = checkpoint_path(config.mixed_inversion["pretrained_model_path"], root, CATALOGUE["sd15"][1])
    specs = [spec("sd15", SD15_PARTS, sd15), spec(video, parts_of(video), local, how)]
    if config.vdm == "AnimateDiff" and options["pretrained_model_path"] is not None:
        base = checkpoint_path(options["pretrained_model_path"], root, "")
        specs.append(spec("animatediff-base", parts_of("animatediff-base"), base,
                          f"a diffusers SD-1.5-family model in {base}"))
    if task.own_model:
        key = task.own_model.format(**idm_options)
        local = checkpoint_path(idm_options["pretrained_model_path"], root, CATALOGUE[key][1])
        extra = ("scheduler",) if "unet" in CATALOGUE[key][5] else ()  # an image model's own UNet brings its sampler
        specs.append(spec(key, parts_of(key, *extra), local))
    annotator = task.annotator(config)
    if annotator:
        specs.append(spec("annotators", conditions.ANNOTATOR_FILES[annotator], root / CATALOGUE["annotators"][1]))
    return specs


def complete(folder: Path, parts) -> bool:
    """Whether `folder` holds every part: the file itself, or a component's config and, for models, weights."""
    def holds(part: str) -> bool:
        if "." in part:
            return (folder / part).is_file()
        kind = next((kind for kind in ("tokenizer", "scheduler") if kind in part), "model")
        return all(any(next((folder / part).glob(p), None) for p in group) for group in REQUIRED[kind])

    return all(map(holds, parts))


def resolve(specs: list[ModelSpec], offline: bool, cache_dir: str | None = None, download: bool = True):
    """Every spec's source, or one MissingModelsError listing all that have none. Online, the files a spec needs
    are fetched into the Hugging Face cache (with `download=False`, only checked: a dry run fetches nothing)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    merged: dict[str, ModelSpec] = {}
    for one in specs:  # one spec per key, with the union of the parts every requester asked for
        old = merged.get(one.key)
        merged[one.key] = one if old is None else replace(old, parts=tuple(dict.fromkeys(old.parts + one.parts)))
    found, missing, errors, unreachable = {}, [], [], None
    for one in merged.values():
        location = str(one.local) if complete(one.local, one.parts) else None
        for repo_id in one.hub_ids if location is None else ():
            allow, ignore = one.patterns()
            args = dict(allow_patterns=allow, ignore_patterns=ignore, cache_dir=cache_dir)
            try:
                if complete(Path(snapshot_download(repo_id, local_files_only=True, **args)), one.parts):
                    location = repo_id
                    break
            except LocalEntryNotFoundError:
                pass
            if offline or unreachable:
                continue
            try:
                snapshot_download(repo_id, dry_run=not download, **args)
                location = repo_id
                break
            except LocalEntryNotFoundError as err:  # huggingface_hub's answer when the Hub cannot be reached
                unreachable = first_line(err)
            except (HfHubHTTPError, OSError) as err:
                errors.append(f"{repo_id}: {type(err).__name__}: {first_line(err)}")
        if location is None:
            missing.append(one)
        else:
            found[one.key] = ResolvedModel(one, location, location == str(one.local))
    if missing:
        raise MissingModelsError(missing, offline, errors, unreachable)
    return found


def first_line(err: BaseException, limit: int = 160) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def vidrd_instructions(checkpoint: Path, sd21: Path, output: Path) -> str:
    """How to make the VidRD folder: it is not on the Hub, it is converted from the authors' ModelT2V.pth."""
    steps = [f"download ModelT2V.pth from {VIDRD_WEIGHTS_SOURCE} to {checkpoint}"] * (not checkpoint.is_file())
    if not complete(sd21, ("tokenizer", "unet/config.json")):
        steps.append(
            "get Stable Diffusion 2.1-base's configs and tokenizer for the converter: "
            f'hf download stabilityai/stable-diffusion-2-1-base --include "*.json" --include "*.txt" '
            f"--local-dir {sd21}"
        )
    convert = f"python {VIDRD_CONVERTER} --checkpoint {checkpoint} --sd21 {sd21} --output {output}"
    return "; then ".join([*steps, f"convert it once (script in the bivdiff repository): {convert}"])


class MissingModelsError(UserError):
    def __init__(self, missing: list[ModelSpec], offline: bool, hub_errors=(), hub_unreachable: str | None = None):
        self.missing = missing
        if offline:
            where = "offline, so only local folders and the Hugging Face cache were searched"
        elif hub_unreachable:
            where = f"the Hub could not be reached: {hub_unreachable}; local folders and the cache were searched"
        else:
            where = "searched local folders, the Hugging Face cache and the Hub"
        lines = [f"{len(missing)} model(s) missing ({where}); nothing was run:"]
        for one in missing:
            parts = ", ".join(filter(None, one.parts))
            lines += [f"  - {one.title}" + (f" [{parts}]" if parts else ""), f"      not in {one.local}"]
            if one.hub_ids:
                where_not = "in the Hugging Face cache as" if offline or hub_unreachable else "on the Hub as"
                lines.append(f"      not {where_not}: {', '.join(one.hub_ids)}")
            lines.append(f"      get it: {one.how_to_get or download_command(one)}")
        if hub_errors:
            lines.append("Hub errors: " + "; ".join(hub_errors[:4]) + (" ..." if len(hub_errors) > 4 else ""))
        on_hub = any(one.hub_ids for one in missing)
        if hub_unreachable and on_hub:
            lines.append("Or run again once the Hub can be reached: bivdiff then downloads them into the cache.")
        if offline and on_hub:
            lines.append(
                "Or run once without --offline (and with HF_HUB_OFFLINE unset): bivdiff then downloads exactly the "
                "files it needs into the Hugging Face cache."
            )
        lines.append("To try the command line without any model: add --tiny (random weights, the pictures are noise).")
        super().__init__("\n".join(lines))


def download_command(one: ModelSpec) -> str:
    """An `hf download` command putting the needed parts of the first Hub id into the local folder."""
    allow, ignore = one.patterns()
    args = " ".join([*(f'--include "{p}"' for p in allow), *(f'--exclude "{p}"' for p in ignore)])
    return f"hf download {one.hub_ids[0]} {args} --local-dir {one.local}"
