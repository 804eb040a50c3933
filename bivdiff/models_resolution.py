"""Where each model of a run comes from: the original `checkpoints/` layout when it is there, else a Hugging Face
Hub id through huggingface_hub's cache (each known id tried in order), downloaded on first use unless offline.

Everything a config needs is resolved before anything is loaded, so a missing model is reported once, together
with every other missing model of that config and how to get each, and nothing runs first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from bivdiff.errors import UserError

# Weight files diffusers and transformers look for, in their order of preference.
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
    "pytorch_model.bin.index.json",
)
CONFIG_FILES = {
    "model": ("config.json",),
    "scheduler": ("scheduler_config.json",),
    "tokenizer": ("tokenizer_config.json", "vocab.json", "tokenizer.json"),
}
VIDRD_CONVERTER = "conversion_scripts/convert_vidrd_to_diffusers.py"
VIDRD_WEIGHTS_SOURCE = "the VidRD authors' download link in the README of github.com/anonymous0x233/ReuseAndDiffuse"


@dataclass(frozen=True)
class Part:
    """One piece of a model repo: a component subfolder ("" = the repo root) or a single file."""

    name: str
    kind: str  # "model", "tokenizer", "scheduler" or "file" (then `name` is the file's path)


@dataclass(frozen=True)
class CatalogueEntry:
    title: str
    folder: str  # under the checkpoints root, as in the original release
    hub_ids: tuple[str, ...]
    licence: str
    safetensors: bool = False  # the Hub repos are known to hold safetensors for every part


# The original `checkpoints/` folders and where the same models live on the Hub; ids are tried in order
# (some original repos moved when their first owners took them down).
CATALOGUE = {
    "sd15": CatalogueEntry(
        "Stable Diffusion 1.5",
        "stable-diffusion-v1-5",
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
        "CreativeML OpenRAIL-M",
        safetensors=True,
    ),
    "sd21": CatalogueEntry(
        "Stable Diffusion 2.1-base (VidRD's configs and tokenizer)",
        "stable-diffusion-2-1-base",
        ("stabilityai/stable-diffusion-2-1-base",),
        "CreativeML OpenRAIL++-M",
    ),
    "controlnet-depth_midas": CatalogueEntry(
        "ControlNet v1.1 depth",
        "ControlNet/control_v11f1p_sd15_depth",
        ("lllyasviel/control_v11f1p_sd15_depth",),
        "OpenRAIL",
        safetensors=True,
    ),
    "controlnet-canny": CatalogueEntry(
        "ControlNet v1.1 canny",
        "ControlNet/control_v11p_sd15_canny",
        ("lllyasviel/control_v11p_sd15_canny",),
        "OpenRAIL",
        safetensors=True,
    ),
    "controlnet-openpose": CatalogueEntry(
        "ControlNet v1.1 openpose",
        "ControlNet/control_v11p_sd15_openpose",
        ("lllyasviel/control_v11p_sd15_openpose",),
        "OpenRAIL",
        safetensors=True,
    ),
    "t2iadapter-depth_midas": CatalogueEntry(
        "T2I-Adapter depth (SD 1.5 v2)",
        "T2IAdapter/t2iadapter_depth_sd15v2",
        ("TencentARC/t2iadapter_depth_sd15v2",),
        "Apache-2.0",
    ),
    "t2iadapter-canny": CatalogueEntry(
        "T2I-Adapter canny (SD 1.5 v2)",
        "T2IAdapter/t2iadapter_canny_sd15v2",
        ("TencentARC/t2iadapter_canny_sd15v2",),
        "Apache-2.0",
    ),
    "instruct-pix2pix": CatalogueEntry(
        "InstructPix2Pix",
        "InstructPix2Pix/instruct-pix2pix",
        ("timbrooks/instruct-pix2pix",),
        "MIT",
        safetensors=True,
    ),
    "sd-inpainting": CatalogueEntry(
        "Stable Diffusion Inpainting",
        "StableDiffusionInpainting/stable-diffusion-inpainting",
        ("stable-diffusion-v1-5/stable-diffusion-inpainting", "runwayml/stable-diffusion-inpainting"),
        "CreativeML OpenRAIL-M",
        safetensors=True,
    ),
    "zeroscope": CatalogueEntry(
        "ZeroScope v2 576w",
        "ZeroScope/zeroscope_v2_576w",
        ("cerspense/zeroscope_v2_576w",),
        "CC-BY-NC-4.0",
    ),
    "vidrd": CatalogueEntry(
        "VidRD (converted to diffusers)",
        "VidRD/diffusers",
        (),
        "the VidRD authors' terms (github.com/anonymous0x233/ReuseAndDiffuse)",
    ),
    "annotators": CatalogueEntry(
        "controlnet_aux annotator weights",
        "Annotators",
        ("lllyasviel/Annotators",),
        "see lllyasviel/Annotators",
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """A model a run needs: the parts it reads, its local folder and its Hub ids."""

    key: str
    title: str
    local: Path
    hub_ids: tuple[str, ...]
    parts: tuple[Part, ...]
    licence: str
    safetensors: bool = False
    # Replaces the download instructions when the model is not on the Hub (VidRD).
    how_to_get: str | None = None


@dataclass(frozen=True)
class ResolvedModel:
    spec: ModelSpec
    location: str  # a local folder, or a Hub id read through the cache
    is_local: bool

    def describe(self) -> str:
        return f"{self.spec.title}: {self.location}" + ("" if self.is_local else " (Hugging Face Hub)")


@dataclass
class Resolver:
    """Finds each model locally, in the Hugging Face cache, or (online) on the Hub."""

    offline: bool
    cache_dir: str | None = None
    hub_errors: list[str] = field(default_factory=list)
    # Set when the Hub cannot be reached: no further probes (each would wait through huggingface_hub's retries).
    hub_unreachable: str | None = None

    def resolve(self, specs: list[ModelSpec]) -> dict[str, ResolvedModel]:
        """Every spec's source, or one MissingModelsError listing all that have none."""
        found, missing = {}, []
        for spec in _merge_specs(specs):
            resolved = self.resolve_one(spec)
            if resolved is None:
                missing.append(spec)
            else:
                found[spec.key] = resolved
        if missing:
            raise MissingModelsError(missing, self.offline, self.hub_errors, self.hub_unreachable)
        return found

    def resolve_one(self, spec: ModelSpec) -> ResolvedModel | None:
        if all(local_has(spec.local, part) for part in spec.parts):
            return ResolvedModel(spec, str(spec.local), True)
        for repo_id in spec.hub_ids:
            if all(cache_has(repo_id, part, self.cache_dir) for part in spec.parts):
                return ResolvedModel(spec, repo_id, False)
        if self.offline or not spec.hub_ids or not self._hub_reachable():
            return None
        for repo_id in spec.hub_ids:
            if all(self._hub_has(repo_id, part) for part in spec.parts):
                return ResolvedModel(spec, repo_id, False)
            if self.hub_unreachable:
                break
        return None

    def _hub_reachable(self) -> bool:
        """One quick connection to the Hub's host before any probe, so a machine without network learns it in
        seconds rather than after huggingface_hub's retries. Skipped behind a proxy, which may be the only way out."""
        if self.hub_unreachable is not None:
            return False
        if not hasattr(self, "_checked_connection"):
            self._checked_connection = True
            problem = hub_connection_problem()
            if problem:
                self.hub_unreachable = problem
        return self.hub_unreachable is None

    def _hub_has(self, repo_id: str, part: Part) -> bool:
        """Fetches the part's small config file (which also caches it); weights come later, when loading."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        filename = part.name if part.kind == "file" else _join(part.name, CONFIG_FILES[part.kind][0])
        try:
            hf_hub_download(repo_id, filename, cache_dir=self.cache_dir)
            return True
        except LocalEntryNotFoundError as err:
            # Raised when the Hub cannot be reached (and the file is not cached).
            self.hub_unreachable = _first_line(err)
            return False
        except (HfHubHTTPError, OSError) as err:
            self.hub_errors.append(f"{repo_id}/{filename}: {type(err).__name__}: {_first_line(err)}")
            return False


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hub_connection_problem(timeout: float = 5.0) -> str | None:
    """None if a TCP connection to the Hub's host opens (or a proxy is configured), else why not."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as err:
        return f"cannot connect to {host}:{port} ({err})"


def _merge_specs(specs: list[ModelSpec]) -> list[ModelSpec]:
    """One spec per key, with the union of the parts every requester asked for (in first-seen order)."""
    merged: dict[str, ModelSpec] = {}
    for spec in specs:
        if spec.key in merged:
            old = merged[spec.key]
            parts = old.parts + tuple(p for p in spec.parts if p not in old.parts)
            merged[spec.key] = ModelSpec(**{**old.__dict__, "parts": parts})
        else:
            merged[spec.key] = spec
    return list(merged.values())


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def local_has(folder: Path, part: Part) -> bool:
    if part.kind == "file":
        return (folder / part.name).is_file()
    where = folder / part.name
    if not any((where / name).is_file() for name in CONFIG_FILES[part.kind]):
        return False
    if part.kind == "model":
        return any((where / name).is_file() for name in WEIGHT_FILES)
    return True


def cache_has(repo_id: str, part: Part, cache_dir: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir), str)

    if part.kind == "file":
        return cached(part.name)
    if not any(cached(_join(part.name, name)) for name in CONFIG_FILES[part.kind]):
        return False
    if part.kind == "model":
        return any(cached(_join(part.name, name)) for name in WEIGHT_FILES)
    return True


def is_offline(flag: bool) -> bool:
    """`--offline`, or HF_HUB_OFFLINE set (as huggingface_hub reads it)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")
    return bool(flag or env or constants.HF_HUB_OFFLINE)


# ----------------------------------------------------------------------------------------------------------
# Specs


def checkpoint_path(value: str | os.PathLike | None, root: Path, default: str) -> Path:
    """A model folder from a config value: relative paths starting with `checkpoints/` are under `root`
    (`--checkpoints`), other relative paths under the working directory; None gives `root / default`."""
    if value is None:
        return root / default
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    parts = path.parts
    if parts and parts[0] == "checkpoints":
        return root.joinpath(*parts[1:])
    return path


def spec(key: str, parts: tuple[Part, ...], local: Path, how_to_get: str | None = None) -> ModelSpec:
    entry = CATALOGUE[key]
    return ModelSpec(
        key=key,
        title=entry.title,
        local=local,
        hub_ids=entry.hub_ids,
        parts=parts,
        licence=entry.licence,
        safetensors=entry.safetensors,
        how_to_get=how_to_get,
    )


def vidrd_instructions(checkpoint: Path, sd21: Path, output: Path, sd21_present: bool) -> str:
    """How to make the VidRD folder: it is not on the Hub, it is converted from the authors' ModelT2V.pth."""
    convert = f"python {VIDRD_CONVERTER} --checkpoint {checkpoint} --sd21 {sd21} --output {output}"
    steps = []
    if not checkpoint.is_file():
        steps.append(f"download ModelT2V.pth from {VIDRD_WEIGHTS_SOURCE} to {checkpoint}")
    if not sd21_present:
        steps.append(
            "get Stable Diffusion 2.1-base's configs and tokenizer for the converter: "
            f'hf download stabilityai/stable-diffusion-2-1-base --include "*.json" --include "*.txt" '
            f"--local-dir {sd21}"
        )
    steps.append(f"convert it once (script in the bivdiff repository): {convert}")
    return "; then ".join(steps)


# ----------------------------------------------------------------------------------------------------------
# The missing-models message


class MissingModelsError(UserError):
    def __init__(
        self, missing: list[ModelSpec], offline: bool, hub_errors: list[str] | None = None,
        hub_unreachable: str | None = None,
    ):
        self.missing = missing
        super().__init__(missing_models_message(missing, offline, hub_errors or [], hub_unreachable))


def missing_models_message(
    missing: list[ModelSpec], offline: bool, hub_errors: list[str], hub_unreachable: str | None = None
) -> str:
    if offline:
        where = "offline, so only local folders and the Hugging Face cache were searched"
    elif hub_unreachable:
        where = f"the Hub could not be reached: {hub_unreachable}; local folders and the cache were searched"
    else:
        where = "searched local folders, the Hugging Face cache and the Hub"
    searched_hub = not offline and not hub_unreachable
    lines = [f"{len(missing)} model(s) missing ({where}); nothing was run:"]
    for spec in missing:
        parts = ", ".join(p.name for p in spec.parts if p.name)
        lines.append(f"  - {spec.title}" + (f" [{parts}]" if parts else ""))
        lines.append(f"      not in {spec.local}")
        if spec.hub_ids:
            where_not = "on the Hub as" if searched_hub else "in the Hugging Face cache as"
            lines.append(f"      not {where_not}: {', '.join(spec.hub_ids)}")
        lines.append(f"      get it: {spec.how_to_get or download_command(spec)}")
    if hub_errors:
        lines.append("Hub errors: " + "; ".join(hub_errors[:4]) + (" ..." if len(hub_errors) > 4 else ""))
    if hub_unreachable and any(spec.hub_ids for spec in missing):
        lines.append("Or run again once the Hub can be reached: bivdiff then downloads them into the cache.")
    if offline and any(spec.hub_ids for spec in missing):
        lines.append(
            "Or run once without --offline (and with HF_HUB_OFFLINE unset): bivdiff then downloads exactly the "
            "files it needs into the Hugging Face cache."
        )
    lines.append("To try the command line without any model: add --tiny (random weights, the pictures are noise).")
    return "\n".join(lines)


def download_command(spec: ModelSpec) -> str:
    """An `hf download` command putting the needed parts of the first Hub id into the local folder."""
    includes = []
    for part in spec.parts:
        if part.kind == "file":
            includes.append(part.name)
        elif part.name:
            includes.append(f"{part.name}/*")
        else:
            includes += ["*.json", "*.safetensors" if spec.safetensors else "diffusion_pytorch_model.*"]
    args = " ".join(f'--include "{p}"' for p in includes)
    excludes = ["*.fp16.*", "*non_ema*", "*.ckpt"] + (["*.bin"] if spec.safetensors else [])
    if any(part.kind != "file" for part in spec.parts):
        args += " " + " ".join(f'--exclude "{p}"' for p in excludes)
    return f"hf download {spec.hub_ids[0]} {args} --local-dir {spec.local}"


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_part(resolved: ResolvedModel, part: str, cls, offline: bool, torch_dtype=None, cache_dir=None, **kwargs):
    """`cls.from_pretrained` for one part (subfolder) of a resolved model, local or through the Hub cache."""
    args = dict(kwargs)
    if torch_dtype is not None:
        # transformers 5 calls it `dtype`; diffusers calls it `torch_dtype`.
        args["dtype" if cls.__module__.startswith("transformers") else "torch_dtype"] = torch_dtype
    if resolved.is_local:
        return cls.from_pretrained(str(Path(resolved.location) / part), **args)
    if part:
        args["subfolder"] = part
    return cls.from_pretrained(resolved.location, local_files_only=offline, cache_dir=cache_dir, **args)


def load_config_dict(resolved: ResolvedModel, part: str, offline: bool, cache_dir=None) -> dict:
    """A scheduler config (scheduler_config.json) of a resolved model, as a dict."""
    from diffusers import DDIMScheduler

    if resolved.is_local:
        return dict(DDIMScheduler.load_config(str(Path(resolved.location) / part)))
    return dict(
        DDIMScheduler.load_config(
            resolved.location, subfolder=part or None, local_files_only=offline, cache_dir=cache_dir
        )
    )
