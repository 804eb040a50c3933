"""Assemble a self-contained, Hub-ready model folder for one BIVDiff task config.

    python conversion_scripts/assemble_pipeline.py \
        --config-name controllable_video_generation_with_controlnet_and_zeroscope \
        --checkpoints checkpoints --output bivdiff-controlnet-zeroscope --dtype fp16

The folder holds `model_index.json` and every component (from the `checkpoints/` tree or the Hugging Face cache,
found as `bivdiff run` finds them), the pipeline file and the modules it imports beside it, custom component code
(the inversion scheduler, the VidRD UNet) in the component's own folder, a README.md model card rendered from
`model_card.md` (task, models, licences, usage) and the task config as `bivdiff_config.yaml`. It loads with

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="<pipeline file stem>", trust_remote_code=True)

and, where bivdiff is installed, with `<PipelineClass>.from_pretrained(folder, trust_remote_code=True)`.
`--tiny` assembles tiny random-weight components instead (offline; for tests, the pictures are noise).
The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import shutil
import string
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from bivdiff.config import RunConfig
from bivdiff.errors import UserError
from bivdiff.models_resolution import ResolvedModel
from bivdiff.runner import build_pipeline, call_arguments, plan_run
from bivdiff.tasks import Inputs, task_for

MODEL_CARD = Path(__file__).resolve().parents[1] / "model_card.md"
STANDARD_LIBRARIES = ("diffusers", "transformers")
_RELATIVE_IMPORT = re.compile(r"^\s*(?:from\s+\.(\w+)\s+import|import\s+\.(\w+))", re.MULTILINE)
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


# ----------------------------------------------------------------------------------------------------------
# Source files


def module_with_siblings(path: Path) -> list[Path]:
    """`path` and every module beside it that it imports relatively (`from .x import y`), transitively."""
    found, todo = [], [Path(path)]
    while todo:
        current = todo.pop()
        if current in found:
            continue
        found.append(current)
        for match in _RELATIVE_IMPORT.finditer(current.read_text(encoding="utf-8")):
            sibling = current.parent / f"{match.group(1) or match.group(2)}.py"
            if sibling.is_file():
                todo.append(sibling)
    return found


def copy_pipeline_code(pipe, folder: Path) -> str:
    """Copy the pipeline's file and its sibling modules into `folder`; returns the pipeline file's stem."""
    source = Path(inspect.getsourcefile(type(pipe)))
    for path in module_with_siblings(source):
        shutil.copy2(path, folder / path.name)
    return source.stem


def vendor_custom_components(folder: Path) -> list[str]:
    """Components whose class lives outside diffusers and transformers (e.g. bivdiff's inversion scheduler) get
    their module copied into their own folder and are declared as `[module stem, class]`, diffusers' custom
    component form, so the folder loads without bivdiff installed."""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    vendored = []
    for name, entry in index.items():
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] and entry[0] not in STANDARD_LIBRARIES):
            continue
        module = importlib.import_module(entry[0])
        files = module_with_siblings(Path(module.__file__))
        for path in files:
            shutil.copy2(path, folder / name / path.name)
        index[name] = [files[0].stem, entry[1]]
        vendored.append(name)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return vendored


# ----------------------------------------------------------------------------------------------------------
# Model card


class _Code(str):
    """A string shown as code, not as a quoted literal, in the usage snippet."""

    def __repr__(self) -> str:
        return str(self)


def usage_snippet(pipe, config: RunConfig, pipeline_stem: str) -> str:
    """A runnable example calling the pipeline with exactly the arguments `bivdiff run` passes for this config."""
    model = config.model
    inputs = Inputs(source=_Code("frames"), condition=_Code("conditions"), mask=_Code("masks"))
    plan = SimpleNamespace(config=config, task=task_for(config), inputs=inputs)
    arguments = call_arguments(plan, _Code("torch.Generator().manual_seed(%d)" % model["seed"]))
    arguments.pop("output_type", None)
    call = ",\n    ".join(f"{key}={value!r}" for key, value in arguments.items())
    lines = [
        "import torch",
        "from diffusers import DiffusionPipeline",
        "from diffusers.utils import export_to_video, load_video",
        "",
        "pipe = DiffusionPipeline.from_pretrained(",
        f'    "PATH_OR_REPO_ID", custom_pipeline="{pipeline_stem}", trust_remote_code=True, torch_dtype=torch.float16',
        ').to("cuda")',
        "",
        f"# {model['video_length']} frames, every {model['frame_rate']} from frame {model['start_frame']}, "
        f"at {model['width']}x{model['height']}",
        f"frames = load_video(\"input.mp4\")[{model['start_frame']}::{model['frame_rate']}][:{model['video_length']}]",
        f"frames = [f.convert(\"RGB\").resize(({model['width']}, {model['height']})) for f in frames]",
        *_input_lines(config),
        f"video = pipe(\n    {call},\n).frames[0]",
        "export_to_video(video, \"bivdiff.mp4\", fps=8)",
    ]
    return "\n".join(lines)


def _input_lines(config: RunConfig) -> list[str]:
    options, model = config.idm_options, config.model
    if config.idm in ("ControlNet", "T2IAdapter"):
        condition = options["condition"]
        mode = "L" if config.idm == "T2IAdapter" and condition == "canny" else "RGB"
        if condition == "canny":
            low, high = options["canny_low_threshold"], options["canny_high_threshold"]
            return [
                "import cv2, numpy as np",
                "from PIL import Image",
                f"conditions = [Image.fromarray(cv2.Canny(np.array(f), {low}, {high})).convert(\"{mode}\") "
                "for f in frames]",
            ]
        detector = "MidasDetector" if condition == "depth_midas" else "OpenposeDetector"
        return [
            f"from controlnet_aux import {detector}  # pip install controlnet_aux",
            f"annotator = {detector}.from_pretrained(\"lllyasviel/Annotators\")",
            f"conditions = [annotator(f, output_type=\"pil\").resize(({model['width']}, {model['height']})) "
            "for f in frames]",
        ]
    if config.idm == "StableDiffusionInpainting":
        selection = f"[{model['start_frame']}::{model['frame_rate']}][:{model['video_length']}]"
        return [
            "# white = regenerate",
            f"masks = load_video(\"mask.mp4\"){selection}",
            f"masks = [m.convert(\"L\").resize(({model['width']}, {model['height']})) for m in masks]",
        ]
    return []


def models_table(config: RunConfig, models: dict[str, ResolvedModel] | None) -> str:
    if not models:
        return "| all | tiny random-weight models of the same families | built in code by bivdiff | Apache-2.0 |"
    rows = []
    for resolved in models.values():
        spec = resolved.spec
        parts = ", ".join(p or "(whole model)" for p in spec.parts)
        hub_id = resolved.location if not resolved.is_local else (spec.hub_ids[0] if spec.hub_ids else None)
        source = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else "converted locally"
        rows.append(f"| {parts} | {spec.title} | {source} | {spec.licence} |")
    return "\n".join(rows)


def render_model_card(pipe, config: RunConfig, models: dict[str, ResolvedModel] | None, pipeline_stem: str) -> str:
    task = task_for(config)
    hub_ids = []
    for resolved in (models or {}).values():
        hub_id = resolved.location if not resolved.is_local else next(iter(resolved.spec.hub_ids), None)
        if hub_id:
            hub_ids.append(hub_id)
    base_models = ("base_model:\n" + "\n".join(f"- {h}" for h in hub_ids)) if hub_ids else ""
    tiny_warning = (
        "\n> **Tiny random weights.** Every component here is a tiny model with random weights, made for tests: "
        "the pictures it makes are noise.\n"
        if config.tiny
        else ""
    )
    template = string.Template(MODEL_CARD.read_text(encoding="utf-8"))
    card = template.substitute(
        title=f"{task.title} with {config.vdm}",
        task=task.title,
        idm=config.idm,
        vdm=config.vdm,
        mixing_ratio=config.idm_options["mixing_ratio"],
        config_name=config.name,
        base_models=base_models,
        tiny_warning=tiny_warning,
        models_table=models_table(config, models),
        pipeline_file=f"{pipeline_stem}.py",
        pipeline_class=type(pipe).__name__,
        usage=usage_snippet(pipe, config, pipeline_stem),
    )
    return card.replace("\n\n---\n", "\n---\n", 1)  # no blank line where there is no base_model list


# ----------------------------------------------------------------------------------------------------------
# The folder


def write_model_folder(
    pipe, output: str | os.PathLike, config: RunConfig, models: dict[str, ResolvedModel] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save `pipe` (already built, e.g. from tiny components) as a self-contained model folder at `output`."""
    output = Path(output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise UserError(f"{output} exists and is not empty: choose a new --output or pass --overwrite.")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        pipe.save_pretrained(staging)
        vendor_custom_components(staging)
        stem = copy_pipeline_code(pipe, staging)
        (staging / "bivdiff_config.yaml").write_text(config.to_yaml(), encoding="utf-8")
        (staging / "README.md").write_text(render_model_card(pipe, config, models, stem), encoding="utf-8")
        _make_public(staging)
        _replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _make_public(folder: Path) -> None:
    # mkdtemp makes the folder private; the result should have the permissions of any new folder.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def _replace(new: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


def assemble(
    config: str | os.PathLike, output: str | os.PathLike, overrides=(), checkpoints: str = "checkpoints",
    offline: bool = False, dtype: str = "fp32", overwrite: bool = False, tiny: bool = False,
) -> Path:
    """Plan the config as `bivdiff run` does, build its pipeline on the CPU and write the model folder."""
    import torch

    plan = plan_run(config, overrides, tiny=tiny, checkpoints=checkpoints, offline=offline)
    pipe = build_pipeline(plan, torch.device("cpu"), getattr(torch, DTYPES[dtype]))
    return write_model_folder(pipe, output, plan.config, plan.models or None, overwrite=overwrite)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--config-name", help="a shipped config (bivdiff list)")
    which.add_argument("--config", help="a YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, as bivdiff run")
    parser.add_argument("--output", required=True, help="the model folder to write")
    parser.add_argument("--checkpoints", default="checkpoints", help="root of the checkpoints/ tree")
    parser.add_argument("--offline", action="store_true", help="local folders and the Hugging Face cache only")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="precision of the saved weights")
    parser.add_argument("--tiny", action="store_true", help="tiny random-weight components (tests; noise)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = Path(args.config) if args.config else args.config_name
        folder = assemble(
            config, args.output, args.overrides, args.checkpoints, args.offline, args.dtype, args.overwrite, args.tiny
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
