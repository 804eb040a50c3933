"""The `bivdiff` command line: `run` a task config, `batch` a file of runs, `list` the configs, `eval` videos."""

import argparse
import json
import logging
import sys
from functools import partial
from pathlib import Path

from bivdiff import __version__, configs as shipped, demo
from bivdiff.batch import evaluate_batch, run_batch
from bivdiff.errors import ConfigError, UserError
from bivdiff.evaluation import evaluate_video
from bivdiff.run_folder import write_text
from bivdiff.runner import run_config

print_line = partial(print, flush=True)
# transformers' notice that its image processors fall back to PIL without torchvision: noise, the pipelines skip them.
logging.getLogger("transformers.utils.import_utils").addFilter(lambda r: "requires torchvision" not in r.getMessage())

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
  bivdiff run --tiny --config-name controllable_video_generation_with_controlnet_and_zeroscope"""

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
  bivdiff run --dry-run --config-name video_editing_with_instruct_pix2pix_and_zeroscope"""

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
  bivdiff eval runs/                                           # runs/eval.csv and runs/eval.md"""

EVAL_DESCRIPTION = """\
Scores of one video as JSON: frame_difference and warp_error (optical-flow warping error, [0, 1] intensity units;
lower is more temporally consistent), and with --clip the CLIP frame consistency and, with --prompt, CLIP text
alignment. Given a batch folder, the scores of every finished job (the warp following the source's motion, CLIP text
alignment against the job's video prompt) go to eval.csv and eval.md there, with the means per task."""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `bivdiff` parser and each command's own by name; descriptions and epilogs keep their line breaks."""
    raw = partial(argparse.ArgumentParser, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser = raw(prog="bivdiff", description=DESCRIPTION)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", parser_class=raw, help="run, batch, list, eval or demo")

    def command(name: str, func, description: str, epilog: str | None = None, tiny_help: str | None = None):
        """A command's parser; with `tiny_help`, first the options saying where its models come from."""
        sub = commands.add_parser(name, description=description, epilog=epilog)
        sub.set_defaults(func=func)
        if tiny_help:
            sub.add_argument("--tiny", action="store_true", help=tiny_help)
            sub.add_argument("--checkpoints", help="root of the original checkpoints/ layout; config paths under "
                             "./checkpoints/ follow it (default: ./checkpoints)", metavar="DIR", default="checkpoints")
            sub.add_argument("--offline", action="store_true", help="use only local folders and the Hugging Face "
                             "cache, never the network (also: HF_HUB_OFFLINE=1)")
        return sub

    run = command("run", run_command, RUN_DESCRIPTION, RUN_EPILOG, tiny_help=(
        "tiny random-weight models of the same families, offline, small defaults (64x64, 4 frames, 4 steps, "
        "overridable): checks the whole path in about a minute on a CPU; the pictures are noise"))
    run.add_argument("items", nargs="*", metavar="[CONFIG] KEY=VALUE",
                     help="optionally a config name or YAML path first, then any number of dotted overrides")
    run.add_argument("--config-name", metavar="NAME", help="a shipped config (bivdiff list shows them)")
    run.add_argument("--config", metavar="PATH", type=Path,
                     help="a YAML file in the same layout (an original one works)")
    run.add_argument("--list", action="store_true", help="list the shipped configs and exit")
    run.add_argument("--output-dir", metavar="DIR", help="where run folders go (sets Model.output_path)")
    run.add_argument("--device", help="cpu, cuda, cuda:N or mps (sets Model.device; default: cuda when available)")
    run.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), help="sets Model.dtype")
    run.add_argument("--dry-run", action="store_true",
                     help="check the config, the input videos and the models, print the plan, and stop")
    batch = command("batch", batch_command, BATCH_DESCRIPTION, BATCH_EPILOG,
                    tiny_help="tiny random-weight models (see bivdiff run --help)")
    batch.add_argument("jobs", metavar="JOBS", help="a YAML or JSON-lines file of jobs")
    batch.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every job")
    batch.add_argument("--output-dir", metavar="DIR", required=True, help="the batch folder: run folders, ledger")
    batch.add_argument("--resume", action="store_true", help="skip the jobs the ledger lists as finished or failed")
    batch.add_argument("--retry-failed", action="store_true", help="as --resume, and rerun the failed jobs")
    batch.add_argument("--dry-run", action="store_true", help="check every job and the models, and stop")
    command("list", run_command, "List the shipped task configs.").set_defaults(list=True)
    evaluate = command("eval", eval_command, EVAL_DESCRIPTION)
    evaluate.add_argument("video", help="an MP4, a GIF or a folder of images (e.g. a run's video_by_bivdiff.mp4), or "
                          "a batch folder")
    evaluate.add_argument("--source", help="the source video: the warp then follows the source's motion instead of "
                          "the video's own")
    evaluate.add_argument("--prompt", help="text for CLIP text alignment (needs --clip)")
    evaluate.add_argument("--clip", metavar="DIR", help="a local CLIP model folder (transformers format)")
    evaluate.add_argument("--output", metavar="FILE", help="also write the JSON here")
    web = command("demo", demo.main, demo.DESCRIPTION, tiny_help=demo.TINY_HELP)
    for flag, options in demo.OPTIONS.items():
        web.add_argument(flag, **options)
    return parser, commands.choices


def run_command(args: argparse.Namespace) -> int:
    if args.list:
        print("Task configs (bivdiff run --config-name NAME; add --tiny to try one offline with random weights):\n",
              *(f"  {name}\n      {shipped.config_description(name)}" for name in shipped.config_names()), sep="\n")
        return 0
    overrides = [item for item in args.items if "=" in item]
    others = [item for item in args.items if "=" not in item]
    configs = others + [config for config in (args.config_name, args.config) if config]
    if len(configs) > 1:
        raise ConfigError(f"Unexpected argument(s) {', '.join(others) or '--config with --config-name'}: give one "
                          "config (a name or a .yaml path) and KEY=VALUE overrides, e.g. bivdiff run --config-name "
                          "NAME Model.seed=1")
    overrides += [f"Model.{key}={getattr(args, key)}" for key in ("device", "dtype") if getattr(args, key) is not None]
    run_config(configs[0] if configs else None, overrides, tiny=args.tiny, checkpoints=args.checkpoints,
               output_dir=args.output_dir, offline=args.offline, dry_run=args.dry_run, log=print_line)
    return 0


def eval_command(args: argparse.Namespace) -> int:
    batch = (Path(args.video).expanduser() / "ledger.jsonl").is_file()
    paths = {"--clip": args.clip} if batch else {"video": args.video, "--source": args.source, "--clip": args.clip}
    for label, value in paths.items():
        if value is not None and not Path(value).expanduser().exists():
            raise UserError(f"{label}: nothing at {value}: give an existing path.")
    if batch:
        csv_path, md_path = evaluate_batch(args.video, args.clip, log=print_line)
        print(f"wrote {csv_path}\nwrote {md_path}")
        print(md_path.read_text())
        return 0
    if args.prompt and not args.clip:
        print("note: --prompt is only used with --clip (CLIP text alignment); ignoring it.", file=sys.stderr)
    try:
        scores = evaluate_video(args.video, source=args.source, prompt=args.prompt, clip_path=args.clip)
    except (ValueError, OSError) as err:
        raise UserError(f"Cannot evaluate {args.video}: {err}") from err
    text = json.dumps({"video": str(args.video), "source": args.source, **scores}, indent=2)
    if args.output:
        Path(args.output).expanduser().parent.mkdir(parents=True, exist_ok=True)
        write_text(Path(args.output).expanduser(), text + "\n")
    print(text)
    return 0


def batch_command(args: argparse.Namespace) -> int:
    bad = [item for item in args.overrides if "=" not in item]
    if bad:
        raise ConfigError(f"Unexpected argument(s) {', '.join(bad)}: give one JOBS file, then KEY=VALUE overrides.")
    options = {key: vars(args)[key] for key in ("tiny", "checkpoints", "offline", "resume", "retry_failed", "dry_run")}
    return run_batch(args.jobs, args.output_dir, args.overrides, **options, log=print_line)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    parser, commands = build_parser()
    if argv[0] in ("-h", "--help", "--version"):
        sys.stdout.write(f"bivdiff {__version__}\n" if argv[0] == "--version" else parser.format_help())
        return 0
    if argv[0] not in commands:
        print(f"{parser.format_usage()}bivdiff: error: unknown command {argv[0]!r}: use run, batch, list, eval or "
              "demo (bivdiff --help).", file=sys.stderr)
        return 2
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
