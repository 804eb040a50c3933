"""The `bivdiff` command line: `run` a task config, `batch` a file of runs, `list` the configs, `eval` a video or a
batch."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bivdiff.errors import ConfigError, UserError

DESCRIPTION = """\
BIVDiff (CVPR 2024): training-free video synthesis. An image diffusion model does the task on every frame
(ControlNet, T2I-Adapter, InstructPix2Pix, Prompt2Prompt, SD Inpainting), Mixed Inversion and a text-to-video
model (VidRD, ZeroScope, AnimateDiff, ModelScope) make the result temporally coherent.

commands:
  run    run a task config on a video (the shipped demo clip by default); see: bivdiff run --help
  batch  run a file of jobs (configs and overrides), models loaded once, resumable, on many GPUs with accelerate
  list   list the task configs, one line each
  eval   temporal-consistency (and with a CLIP model, CLIP) scores of a video as JSON, or of a batch as CSV
  demo   open the web demo in the browser (pip install "bivdiff[demo]"); see: bivdiff demo --help

first try (no download, no video of your own, about a minute on a CPU; tiny random models, the pictures are noise):
  bivdiff run --tiny --config-name controllable_video_generation_with_controlnet_and_zeroscope
"""

RUN_DESCRIPTION = """\
Run one task config, like the original `python inference.py --config-name=NAME`. Each run writes a new folder
<Model.output_path>/<config>-<timestamp>/ with the source, the condition or mask, the image model's frames and
the final video (MP4 and GIF each), a labelled side-by-side comparison, the resolved config.yaml and stats.json
(time, UNet calls and peak memory per stage).

Models are read from the original checkpoints/ layout (--checkpoints), else from the Hugging Face cache, and
downloaded into it on first use unless --offline. If any model is missing, one message lists them all and how
to get each, and nothing runs."""

RUN_EPILOG = """\
overrides (Hydra style, any key of the config by its dotted name):
  Model.num_inference_steps=20  Model.video_length=16  Model.video_path=my_clip.mp4  Model.seed=0
  IDM.ControlNet.condition=depth_midas  IDM.ControlNet.condition_video=edges.mp4  Model.frame_stride=2
  "Model.idm_prompt=A fox running through the snow"

examples:
  bivdiff list
  bivdiff run --tiny --config-name controllable_video_generation_with_t2iadapter_and_vidrd
  bivdiff run --config-name controllable_video_generation_with_controlnet_and_zeroscope Model.video_path=bear.mp4
  bivdiff run --config my_task.yaml --checkpoints /data/checkpoints --offline
  bivdiff run --dry-run --config-name video_editing_with_instruct_pix2pix_and_zeroscope
"""


def command_parser(prog: str, description: str, epilog: str | None = None, parents=()) -> argparse.ArgumentParser:
    """A parser whose description and epilog keep their line breaks."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, parents=list(parents),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def model_options(tiny_help: str = "tiny random-weight models (see bivdiff run --help)") -> argparse.ArgumentParser:
    """--tiny, --checkpoints and --offline: where the models of every command that runs them come from."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--tiny", action="store_true", help=tiny_help)
    parent.add_argument("--checkpoints", metavar="DIR", default="checkpoints",
                        help="root of the original checkpoints/ layout; config paths under ./checkpoints/ follow it "
                        "(default: ./checkpoints)")
    parent.add_argument("--offline", action="store_true",
                        help="use only local folders and the Hugging Face cache, never the network (also: "
                        "HF_HUB_OFFLINE=1)")
    return parent


def build_run_parser() -> argparse.ArgumentParser:
    tiny_help = ("tiny random-weight models of the same families, offline, small defaults (64x64, 4 frames, 4 steps, "
                 "overridable): checks the whole path in about a minute on a CPU; the pictures are noise")
    parser = command_parser("bivdiff run", RUN_DESCRIPTION, RUN_EPILOG, [model_options(tiny_help)])
    parser.add_argument("items", nargs="*", metavar="[CONFIG] KEY=VALUE",
                        help="optionally a config name or YAML path first, then any number of dotted overrides")
    parser.add_argument("--config-name", metavar="NAME", help="a shipped config (bivdiff list shows them)")
    parser.add_argument("--config", metavar="PATH", help="a YAML file in the same layout (an original one works)")
    parser.add_argument("--list", action="store_true", help="list the shipped configs and exit")
    parser.add_argument("--output-dir", metavar="DIR", help="where run folders go (sets Model.output_path)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (sets Model.device; default: cuda when available)")
    parser.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), help="sets Model.dtype")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, the input videos and the models, print the plan, and stop")
    return parser


BATCH_DESCRIPTION = """\
Run every job of JOBS, a YAML file (a list of jobs) or a JSON-lines file (.jsonl, one job per line). A job has a
`config` (a shipped name or a YAML path), optional `overrides` (a list of KEY=VALUE, or a mapping) and an optional
`id` naming its run folder <output-dir>/<id>-<timestamp>/ (default job-001, job-002, ...). KEY=VALUE after JOBS
apply to every job (a job's own overrides win).

Every job is checked before any model loads; a job with bad input is recorded as failed and the others run.
Jobs sharing models run back to back on one loaded pipeline. Each job that finishes or fails is appended to
<output-dir>/ledger.jsonl; a summary table ends the batch, and the exit code is 1 if any job failed."""

BATCH_EPILOG = """\
example JOBS file (YAML):
  - id: bear-canny
    config: controllable_video_generation_with_controlnet_and_zeroscope
    overrides: {Model.video_path: bear.mp4, "Model.idm_prompt": "a bear, oil painting"}
  - config: video_editing_with_instruct_pix2pix_and_zeroscope
    overrides: ["Model.seed=1"]

examples:
  bivdiff batch jobs.yaml --output-dir runs/
  bivdiff batch jobs.yaml --output-dir runs/ --resume          # after a crash: skip the finished jobs
  bivdiff batch jobs.yaml --output-dir runs/ --retry-failed    # rerun the failed ones too
  accelerate launch --num_processes 4 -m bivdiff batch jobs.yaml --output-dir runs/   # 4 GPUs, one per process
  bivdiff eval runs/                                           # runs/eval.csv and runs/eval.md
"""


def build_batch_parser() -> argparse.ArgumentParser:
    parser = command_parser("bivdiff batch", BATCH_DESCRIPTION, BATCH_EPILOG, [model_options()])
    parser.add_argument("jobs", metavar="JOBS", help="a YAML or JSON-lines file of jobs")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every job")
    parser.add_argument("--output-dir", metavar="DIR", required=True, help="the batch folder: run folders, ledger")
    parser.add_argument("--resume", action="store_true", help="skip the jobs the ledger lists as finished or failed")
    parser.add_argument("--retry-failed", action="store_true", help="as --resume, and rerun the failed jobs")
    parser.add_argument("--dry-run", action="store_true", help="check every job and the models, and stop")
    return parser


EVAL_DESCRIPTION = """\
Scores of one video as JSON: frame_difference and warp_error (optical-flow warping error, [0, 1] intensity units;
lower is more temporally consistent), and with --clip the CLIP frame consistency and, with --prompt, CLIP text
alignment. Given a batch folder, the scores of every finished job (the warp following the source's motion, CLIP text
alignment against the job's video prompt) go to eval.csv and eval.md there, with the means per task."""


def build_eval_parser() -> argparse.ArgumentParser:
    parser = command_parser("bivdiff eval", EVAL_DESCRIPTION)
    parser.add_argument("video", help="an MP4, a GIF or a folder of images (e.g. a run's video_by_bivdiff.mp4), or a "
                        "batch folder")
    parser.add_argument("--source", help="the source video: the warp then follows the source's motion instead of the "
                        "video's own")
    parser.add_argument("--prompt", help="text for CLIP text alignment (needs --clip)")
    parser.add_argument("--clip", metavar="DIR", help="a local CLIP model folder (transformers format)")
    parser.add_argument("--output", metavar="FILE", help="also write the JSON here")
    return parser


def build_main_parser() -> argparse.ArgumentParser:
    parser = command_parser("bivdiff", DESCRIPTION)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("command", nargs="?", choices=COMMANDS, help="run, batch, list, eval or demo")
    return parser


def print_line(text: str) -> None:
    print(text, flush=True)


def run_command(argv: list[str]) -> int:
    from bivdiff.runner import run_config

    args = build_run_parser().parse_intermixed_args(argv)
    if args.list:
        return list_command([])
    overrides = [item for item in args.items if "=" in item]
    others = [item for item in args.items if "=" not in item]
    if len(others) > 1 or (others and (args.config_name or args.config)) or (args.config_name and args.config):
        raise ConfigError(
            f"Unexpected argument(s) {', '.join(others) or '--config with --config-name'}: give one config (a name "
            "or a .yaml path) and KEY=VALUE overrides, e.g. bivdiff run --config-name NAME Model.seed=1"
        )
    overrides += [f"{key}={value}" for key, value in (("Model.device", args.device), ("Model.dtype", args.dtype))
                  if value is not None]
    config = Path(args.config) if args.config else args.config_name or (others[0] if others else None)
    run_config(config, overrides, tiny=args.tiny, checkpoints=args.checkpoints, output_dir=args.output_dir,
               offline=args.offline, dry_run=args.dry_run, log=print_line)
    return 0


def list_command(argv: list[str]) -> int:
    from bivdiff import configs as shipped

    command_parser("bivdiff list", "List the shipped task configs.").parse_args(argv)
    print("Task configs (bivdiff run --config-name NAME; add --tiny to try one offline with random weights):\n")
    for name in shipped.config_names():
        print(f"  {name}\n      {shipped.config_description(name)}")
    return 0


def eval_command(argv: list[str]) -> int:
    args = build_eval_parser().parse_args(argv)
    batch = (Path(args.video).expanduser() / "ledger.jsonl").is_file()
    for label, value in (("video", args.video), ("--source", args.source), ("--clip", args.clip)):
        if value is not None and (label == "--clip" or not batch) and not Path(value).expanduser().exists():
            raise UserError(f"{label}: nothing at {value}: give an existing path.")
    if batch:
        from bivdiff.batch import evaluate_batch

        for path in evaluate_batch(args.video, args.clip, log=print_line):
            print(f"wrote {path}")
        print((Path(args.video).expanduser() / "eval.md").read_text())
        return 0
    from bivdiff.evaluation import evaluate_video

    if args.prompt and not args.clip:
        print("note: --prompt is only used with --clip (CLIP text alignment); ignoring it.", file=sys.stderr)
    try:
        scores = evaluate_video(args.video, source=args.source, prompt=args.prompt, clip_path=args.clip)
    except (ValueError, OSError) as err:
        raise UserError(f"Cannot evaluate {args.video}: {err}") from err
    text = json.dumps({"video": str(args.video), "source": args.source, **scores}, indent=2)
    if args.output:
        from bivdiff.run_folder import write_text

        output = Path(args.output).expanduser()
        output.parent.mkdir(parents=True, exist_ok=True)
        write_text(output, text + "\n")
    print(text)
    return 0


def demo_command(argv: list[str]) -> int:
    from bivdiff.demo import main as demo_main

    return demo_main(argv)


def batch_command(argv: list[str]) -> int:
    from bivdiff.batch import run_batch

    args = build_batch_parser().parse_intermixed_args(argv)
    bad = [item for item in args.overrides if "=" not in item]
    if bad:
        raise ConfigError(f"Unexpected argument(s) {', '.join(bad)}: give one JOBS file, then KEY=VALUE overrides.")
    options = vars(args)
    return run_batch(options.pop("jobs"), options.pop("output_dir"), options.pop("overrides"), **options,
                     log=print_line)


COMMANDS = {"run": run_command, "batch": batch_command, "list": list_command, "eval": eval_command,
            "demo": demo_command}


def quiet_torchvision_notice():
    """transformers announces at import that its image processors fall back to PIL without torchvision; the
    pipelines never use those processors, so the notice is noise on every command."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.get_logger("transformers")  # makes sure transformers' handler exists
    for handler in logging.getLogger("transformers").handlers:
        handler.addFilter(lambda record: "requires torchvision" not in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    quiet_torchvision_notice()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        build_main_parser().print_help()
        return 0
    if argv[0] == "--version":
        from bivdiff import __version__

        print(f"bivdiff {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        build_main_parser().print_usage(sys.stderr)
        print(f"bivdiff: error: unknown command {argv[0]!r}: use run, batch, list, eval or demo (bivdiff --help).",
              file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
