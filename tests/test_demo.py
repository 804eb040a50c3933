"""The web demo through its HTTP API (gradio_client) on a local server with tiny models: a page run is a
`bivdiff run` with the page's fields as overrides, bad inputs get the command line's own messages, and the app
keeps serving after a failure."""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gradio_client = pytest.importorskip("gradio_client", reason="the demo tests need gradio: pip install -e '.[test]'")
pytest.importorskip("gradio", reason="the demo tests need gradio: pip install -e '.[test]'")

from cli_helpers import run_cli, stats

from bivdiff import configs as shipped
from bivdiff.config import load_config
from bivdiff.demo import FIRST_CONFIG, TINY_LABEL, TINY_OFFER, DemoSettings, form_defaults, form_overrides

INPAINTING = "video_inpainting_with_stable_diffusion_inpainting_and_vidrd"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A demo started as `bivdiff demo --tiny --offline` with an empty checkpoints folder, on 127.0.0.1."""
    from bivdiff.demo import build_app, launch

    root = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(
        tiny=True, checkpoints=str(root / "no_checkpoints"), output_dir=str(root / "outputs"), offline=True
    )
    app = build_app(settings)
    launch(app, settings, port=None, block=False)
    try:
        yield app, settings, gradio_client.Client(app.local_url, verbose=False)
    finally:
        app.close()


def page_fields(config=FIRST_CONFIG, tiny=True, **changes) -> dict:
    """The fields as the page shows them for `config`, with `changes` typed in."""
    values = form_defaults(config, tiny)
    fields = {"config": config, "tiny": tiny, "video": None, "mask": None}
    fields.update({key: values[key] for key in ("idm_prompt", "vdm_prompt", "steps", "mixing_ratio")})
    fields.update({key: values[key] for key in ("frames", "stride", "seed")}, extra="")
    return {**fields, **changes}


def press_run(client, **fields):
    return client.predict(*page_fields(**fields).values(), api_name="/run")


def cli_error(capsys, *args) -> str:
    code, _, err = run_cli(capsys, "run", *args)
    assert code != 0
    return err.removeprefix("error: ").strip()


def test_a_tiny_run_writes_the_run_folder_and_shows_every_part_of_it(server):
    _, settings, client = server
    fields = page_fields(
        idm_prompt="A fox, running: in snow", steps=2, frames=3, seed=7, extra="Model.width=32\nModel.height=32"
    )
    job = client.submit(*fields.values(), api_name="/run")
    progress = set()
    while not job.done():
        progress.update(unit.desc for unit in job.status().progress_data or [])
        time.sleep(0.01)
    status, comparison, gallery, table, archive = job.result()

    # The progress bar followed the pipeline's stages, named as the pipeline names them.
    assert {"Frame-wise generation (ControlNet)", "Temporal smoothing (video UNet)"} <= progress
    assert TINY_LABEL in status
    folder = Path(status.split("Run folder: `")[1].split("`")[0])
    assert folder.parent.resolve() == Path(settings.output_dir).resolve()

    # The run used the page's values, as `bivdiff run` overrides.
    config = load_config(folder / "config.yaml")
    model = config.model
    assert (model["idm_prompt"], model["num_inference_steps"], model["video_length"], model["seed"]) == (
        "A fox, running: in snow",
        2,
        3,
        7,
    )
    assert (model["width"], model["height"]) == (32, 32)

    # Shown: the comparison, each stage's video with its label, the per-stage table, the zipped folder.
    assert Path(comparison).read_bytes() == (folder / "comparison.mp4").read_bytes()
    recorded = stats(folder)
    captions = [item["caption"] for item in gallery]
    assert captions == [
        "source",
        "condition (canny)",
        "image model: ControlNet (tiny: noise)",
        "BIVDiff: ZeroScope (tiny: noise)",
    ]
    expected_files = ["source_video.mp4", "canny_condition.mp4", "video_by_idm.mp4", "video_by_bivdiff.mp4"]
    for item, name in zip(gallery, expected_files):
        assert Path(item["video"]).read_bytes() == (folder / name).read_bytes()
    for stage in recorded["stages"]:
        assert f"| {stage['stage']} | {stage['seconds']:.2f} |" in table
    assert f"| *total* | {recorded['seconds']['total']:.2f} |" in table
    with zipfile.ZipFile(archive) as zipped:
        names = set(zipped.namelist())
    assert {f"{folder.name}/{p.name}" for p in folder.iterdir()} <= names


def test_an_uploaded_video_and_mask_drive_an_inpainting_run(server):
    from bivdiff.video_io import default_clip_path, default_mask_path

    _, _, client = server
    video, mask = (gradio_client.handle_file(str(path)) for path in (default_clip_path(), default_mask_path()))
    status, comparison, gallery, _, _ = press_run(
        client, config=INPAINTING, video=video, mask=mask, steps=2, frames=3, extra="Model.width=32\nModel.height=32"
    )
    assert comparison is not None, status
    folder = Path(status.split("Run folder: `")[1].split("`")[0])
    config = load_config(folder / "config.yaml")
    # Uploads reach the run as the command line's own keys, under their file names.
    assert Path(config.model["video_path"]).name == default_clip_path().name
    assert Path(config.idm_options["video_mask_path"]).name == default_mask_path().name
    assert [item["caption"] for item in gallery][:2] == ["source", "mask"]


def test_bad_inputs_get_the_command_lines_messages_before_any_model_loads(server, capsys):
    _, settings, client = server
    before = set(Path(settings.output_dir).glob("*")) if Path(settings.output_dir).exists() else set()
    cases = [
        ({"frames": 1000}, ["Model.video_length=1000"]),
        ({"steps": 0}, ["Model.num_inference_steps=0"]),
        ({"extra": "Model.num_inference_step=3"}, ["Model.num_inference_step=3"]),
    ]
    for fields, overrides in cases:
        status = press_run(client, **fields)[0]
        message = cli_error(capsys, "--tiny", "--config-name", FIRST_CONFIG, *overrides)
        assert message in status
        assert status.startswith("**Nothing was run.**")
    after = set(Path(settings.output_dir).glob("*")) if Path(settings.output_dir).exists() else set()
    assert after == before, "a run folder was made for a run that cannot start"


def test_an_upload_that_is_not_a_video_is_an_error_in_the_page_and_the_app_keeps_working(server, tmp_path):
    _, _, client = server
    fake = tmp_path / "holiday.mp4"
    fake.write_text("not a video")
    status, comparison, gallery, _, archive = press_run(client, video=gradio_client.handle_file(str(fake)))
    assert status.startswith("**Nothing was run.**") and "holiday.mp4" in status and "Model.video_path" in status
    assert (comparison, gallery, archive) == (None, [], None)
    # The same server still answers, with the next input's own message.
    assert "Model.video_length" in press_run(client, frames=0)[0]


def test_without_weights_the_page_says_what_is_missing_and_offers_the_tiny_models(server, capsys):
    _, settings, client = server
    status = press_run(client, tiny=False)[0]
    message = cli_error(capsys, "--offline", "--checkpoints", settings.checkpoints, "--config-name", FIRST_CONFIG)
    assert "model(s) missing" in message
    assert message in status
    assert TINY_OFFER in status


@pytest.mark.parametrize("name", shipped.config_names())
def test_the_pages_fields_reproduce_each_configs_own_values(name):
    """Pressing Run without touching a field runs the config as it is: its fields, turned into overrides, change
    nothing in the resolved config (with and without the tiny defaults)."""
    path = shipped.config_path(name)
    for tiny in (False, True):
        overrides = form_overrides(**page_fields(name, tiny))
        assert (
            load_config(path, overrides, tiny=tiny, name=name).data
            == load_config(path, tiny=tiny, name=name).data
        )


def test_the_mask_field_only_reaches_the_inpainting_config(tmp_path):
    mask = str(tmp_path / "mask.mp4")
    inpainting = form_overrides(**page_fields(INPAINTING, mask=mask))
    assert f"IDM.StableDiffusionInpainting.video_mask_path={mask}" in inpainting
    assert not any("video_mask_path" in item for item in form_overrides(**page_fields(mask=mask)))


def test_runs_are_queued_one_at_a_time(server):
    app, _, _ = server
    (run,) = [fn for fn in app.fns.values() if fn.api_name == "run"]
    assert run.concurrency_limit == 1
