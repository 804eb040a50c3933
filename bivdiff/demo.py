"""`bivdiff demo`: a Gradio web app over the same runner as `bivdiff run`.

Every field of the page becomes a dotted override (`Model.num_inference_steps=20`, ...), so a run from the page
is exactly the command-line run with those overrides: same checks and messages before any model loads, same run
folder. Gradio's queue runs one job at a time per process; the others wait their turn.
"""

import contextlib
import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from bivdiff import configs as shipped
from bivdiff.config import load_config
from bivdiff.errors import UserError
from bivdiff.models_resolution import MissingModelsError
from bivdiff.runner import FIRST_TRY as FIRST_CONFIG, run_config

INPAINTING = "StableDiffusionInpainting"
TINY_LABEL = "Tiny models: random weights, built offline in seconds. The pictures are NOISE (checks the app only)."
TINY_OFFER = ("No weights here? Tick **Tiny models** to try every task with tiny random models: it runs in seconds, "
              "and the pictures are noise.")
INSTALL_HINT = 'The web demo needs gradio: pip install "bivdiff[demo]"'
# The `bivdiff demo` command line; bivdiff.cli adds the options saying where the models come from.
DESCRIPTION = ("Open the BIVDiff web demo (Gradio): every task config, with the same checks, run folders and models "
               f"as `bivdiff run`. {INSTALL_HINT}.")
TINY_HELP = "start with tiny random-weight models ticked (offline, seconds per run; the pictures are noise)"
OPTIONS = {"--output-dir": dict(metavar="DIR", default="outputs", help="where run folders go"),
           "--host": dict(default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
           "--port": dict(type=int, default=7860, help="port (default 7860; the next free one if taken)"),
           "--share": dict(action="store_true", help="also open a public gradio.live link")}


@dataclass
class DemoSettings:
    """What `bivdiff demo` was started with; shared by every run of the page."""

    tiny: bool = False
    checkpoints: str = "checkpoints"
    output_dir: str = "outputs"
    offline: bool = False


def form_defaults(name: str, tiny: bool) -> dict:
    """The page's field values for a config: what a run with no override uses."""
    data = load_config(shipped.config_path(name), tiny=tiny, name=name).data
    model = data["Model"]
    return dict(description=shipped.config_description(name), idm=model["idm"], vdm=model["vdm"],
                idm_prompt=model["idm_prompt"] or "", vdm_prompt=model["vdm_prompt"] or "",
                steps=model["num_inference_steps"], mixing_ratio=data["IDM"][model["idm"]]["mixing_ratio"],
                frames=model["video_length"], stride=model["frame_rate"], seed=model["seed"])


def form_overrides(config, tiny, video, mask, idm_prompt, vdm_prompt, steps, mixing_ratio, frames, stride, seed,
                   extra="") -> list[str]:
    """Dotted overrides for the page's fields (in the order of the Gradio inputs) that hold a value; `extra` adds
    any others, one per line."""
    # An unknown config name is left to the runner, which names the nearest shipped ones.
    idm = form_defaults(config, tiny)["idm"] if config in shipped.config_names() else None
    pairs = {"Model.video_path": video, f"IDM.{INPAINTING}.video_mask_path": mask if idm == INPAINTING else None,
             "Model.idm_prompt": idm_prompt, "Model.vdm_prompt": vdm_prompt, "Model.num_inference_steps": steps,
             f"IDM.{idm}.mixing_ratio": mixing_ratio if idm else None, "Model.video_length": frames,
             "Model.frame_rate": stride, "Model.seed": seed}
    overrides = [f"{key}={value}" for key, value in pairs.items() if value is not None]
    return overrides + [line.strip() for line in (extra or "").splitlines() if line.strip()]


def stage_videos(folder: Path, stats: dict) -> list[tuple[str, str]]:
    """(MP4 path, label) of each video of the run but the comparison, in pipeline order."""
    noise = " (tiny: noise)" if stats.get("tiny") else ""
    labels = {"source_video": "source", "source_mask": "mask", "video_by_idm": f"image model: {stats['idm']}{noise}",
              "video_inverted_and_reconstructed": "source, inverted and reconstructed",
              "video_by_bivdiff": f"BIVDiff: {stats['vdm']}{noise}"}
    labels.update({what: f"condition ({what.removesuffix('_condition')})" for what in stats["files"]
                   if what.endswith("_condition")})
    return [(str(folder / f"{what}.mp4"), labels.get(what, what)) for what, names in stats["files"].items()
            if f"{what}.mp4" in names and what != "comparison"]


def stats_table(stats: dict) -> str:
    """Markdown: time, network calls and peak memory of each pipeline stage, then the run's totals."""

    def mib(size) -> str:
        return "-" if size is None else f"{size / 2**20:,.0f} MiB"

    rows = ["| stage | seconds | network calls | peak memory |", "|---|---:|---|---:|"]
    for stage in stats["stages"]:
        seconds = "-" if stage["seconds"] is None else f"{stage['seconds']:.2f}"  # None: calls outside a timed stage
        calls = ", ".join(f"{name} {count}" for name, count in stage["network_calls"].items()) or "-"
        rows.append(f"| {stage['stage']} | {seconds} | {calls} | {mib(stage['peak_memory_bytes'])} |")
    rows += [f"| *{step.replace('_', ' ')}* | {value:.2f} | | |" for step, value in stats["seconds"].items()]
    peak = stats["peak_memory"]
    kind = "CUDA peak allocated" if peak["kind"] == "cuda_max_allocated" else "process peak RSS"
    rows.append(f"\nPeak memory of the run ({kind}): **{mib(peak['bytes'])}**; "
                f"{stats['unet_calls_total']} network calls on {stats['device']} ({stats['dtype']}).")
    return "\n".join(rows)


def build_app(settings: DemoSettings):
    try:
        import gradio as gr
    except ImportError:
        raise UserError(INSTALL_HINT) from None

    first = form_defaults(FIRST_CONFIG, settings.tiny)

    # Gradio finds the progress tracker by its default value; track_tqdm follows the pipelines' own stage bars.
    def run(config, tiny, video, mask, idm_prompt, vdm_prompt, steps, ratio, frames, stride, seed, extra,
            progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        lines = []

        def log(text: str):
            lines.append(text)
            progress(None, desc=text.splitlines()[0])

        try:
            overrides = form_overrides(config, tiny, video, mask, idm_prompt, vdm_prompt, steps, ratio, frames, stride,
                                       seed, extra)
            folder = run_config(config, overrides, tiny=tiny, checkpoints=settings.checkpoints,
                                output_dir=settings.output_dir, offline=settings.offline, log=log)
        except UserError as err:
            offer = "\n\n" + TINY_OFFER if not tiny and isinstance(err, MissingModelsError) else ""
            return f"**Nothing was run.**\n\n```text\n{err}\n```{offer}", None, [], "", None
        except Exception as err:  # noqa: BLE001 - the page reports any failure and stays up for the next run
            return f"**The run failed:** `{type(err).__name__}: {err}`\n\n" + "\n".join(lines[-2:]), None, [], "", None
        stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
        # Relative to the working directory when under it, as the command line prints run folders.
        cwd = Path.cwd().resolve()
        shown = folder.resolve().relative_to(cwd) if folder.resolve().is_relative_to(cwd) else folder
        banner = f"**{TINY_LABEL}**\n\n" if stats.get("tiny") else ""
        archive = shutil.make_archive(str(folder), "zip", root_dir=folder.parent, base_dir=folder.name)
        return (f"{banner}Run folder: `{shown}`", str(folder / "comparison.mp4"), stage_videos(folder, stats),
                stats_table(stats), archive)

    def choose(config, tiny):
        values = form_defaults(config, tiny)
        about = f"{values['description']}  \nimage model **{values['idm']}**, video model **{values['vdm']}**"
        fields = [values[key] for key in ("idm_prompt", "vdm_prompt", "steps", "mixing_ratio", "frames", "stride",
                                          "seed")]
        return about, gr.update(visible=values["idm"] == INPAINTING, value=None), *fields, gr.update(visible=tiny)

    with gr.Blocks(title="BIVDiff demo") as app:
        gr.Markdown("# BIVDiff: training-free video synthesis\nAn image model does the task on every frame, Mixed "
                    "Inversion and a text-to-video model make the result temporally coherent. Each run writes a run "
                    "folder, as `bivdiff run` does.")
        tiny_banner = gr.Markdown(f"**{TINY_LABEL}**", visible=settings.tiny)
        with gr.Row():
            with gr.Column(scale=2):
                config = gr.Dropdown(shipped.config_names(), value=FIRST_CONFIG, label="Task config (bivdiff list)")
                about = gr.Markdown()
                tiny = gr.Checkbox(value=settings.tiny, label=TINY_LABEL)
                video = gr.Video(label="Source video (empty: the shipped Big Buck Bunny clip)", sources=["upload"])
                mask = gr.Video(label="Mask video, white = regenerate (empty: the shipped mask)", sources=["upload"],
                                visible=False)
                idm_prompt = gr.Textbox(first["idm_prompt"], label="Image-model prompt (Model.idm_prompt)")
                vdm_prompt = gr.Textbox(first["vdm_prompt"], label="Video-model prompt (Model.vdm_prompt)")
                with gr.Row():
                    steps = gr.Number(first["steps"], label="Steps", precision=0)
                    ratio = gr.Slider(0.0, 1.0, first["mixing_ratio"], step=0.05, label="Mixing ratio")
                with gr.Row():
                    frames = gr.Number(first["frames"], label="Frames", precision=0)
                    stride = gr.Number(first["stride"], label="Frame stride", precision=0)
                    seed = gr.Number(first["seed"], label="Seed", precision=0)
                extra = gr.Textbox(label="More overrides, one KEY=VALUE per line (as on the command line)", lines=2,
                                   placeholder="IDM.ControlNet.condition=depth_midas\nModel.width=256")
                go = gr.Button("Run", variant="primary")
            with gr.Column(scale=3):
                status = gr.Markdown("Choose a config and press **Run**.")
                # Its tiles carry their own labels.
                comparison = gr.Video(label="Comparison: source | condition or mask | image model | BIVDiff",
                                      elem_id="comparison", show_label=False)
                stages = gr.Gallery(label="Each stage's video", columns=3, height="auto")
                stats = gr.Markdown()
                download = gr.File(label="Run folder (zip)")

        form_fields = [about, mask, idm_prompt, vdm_prompt, steps, ratio, frames, stride, seed, tiny_banner]
        # No triggers: on page load and whenever an input (the config, the tiny box) changes.
        gr.on(triggers=None, fn=choose, inputs=[config, tiny], outputs=form_fields, api_visibility="private",
              queue=False)
        go.click(run, [config, tiny, video, mask, idm_prompt, vdm_prompt, steps, ratio, frames, stride, seed, extra],
                 [status, comparison, stages, stats, download], api_name="run", concurrency_limit=1)
    return app


def launch(app, settings: DemoSettings, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True):
    """Serve the app, and the run folders in `settings.output_dir` wherever it is, on the first free port from `port`
    (none: one the system picks; Gradio's own search from 7860 races with other servers starting at the same time)."""
    return app.launch(server_name=host, server_port=free_port(host, port or 0), share=share, quiet=not block,
                      allowed_paths=[str(Path(settings.output_dir).resolve())], prevent_thread_lock=not block)


def main(args) -> int:
    """`bivdiff demo` with the options `bivdiff.cli` parsed."""
    settings = DemoSettings(args.tiny, args.checkpoints, args.output_dir, args.offline)
    launch(build_app(settings), settings, host=args.host, port=args.port, share=args.share)
    return 0


def free_port(host: str, port: int, tries: int = 100) -> int:
    """The first port from `port` that binds on `host` (port 0: one the system picks)."""
    for candidate in range(port, port + tries):
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.bind((host, candidate))
            return probe.getsockname()[1]
    raise UserError(f"No free port in {port}..{port + tries - 1} on {host}: give another with --port.")
