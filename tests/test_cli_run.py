"""`bivdiff run --tiny` end to end for every task whose pipeline exists, plus the command line's help, listing,
errors and run folders. Everything is offline."""

import os
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest
from cli_helpers import FAST, only_run_folder, run_cli, stats

from bivdiff import configs as shipped
from bivdiff.config import load_config
from bivdiff.run_folder import publish_run_folder, staging_folder
from bivdiff.video_io import read_video, read_video_clip

CONTROLNET_ZEROSCOPE = "controllable_video_generation_with_controlnet_and_zeroscope"
NUM_FRAMES = 3
SHIPPED_FPS = 25 / 4  # the shipped clip's 25 fps at the configs' frame stride 4


# Network calls per stage for 2 steps and 3 frames (one frame chunk): stage 1 runs the UNet (and ControlNet) once
# per step; an adapter once per chunk; mixing ratio 1 skips the video inversion.
EXPECTED_CALLS = {
    CONTROLNET_ZEROSCOPE: {
        "frame-wise generation": {"unet": 2, "controlnet": 2},
        "image inversion": {"unet": 2},
        "temporal smoothing": {"video_unet": 2},
    },
    "controllable_video_generation_with_t2iadapter_and_vidrd": {
        "frame-wise generation": {"unet": 2, "adapter": 1},
        "image inversion": {"unet": 2},
        "temporal smoothing": {"video_unet": 2},
    },
}


# Every original config, and for each newer video model the configs that build it differently: on SD-1.5's
# `unet` (ControlNet) or on `inversion_unet` beside an IDM's own UNet (inpainting). The rest were run by hand.
TINY_RUNS = [n for n in shipped.config_names() if not n.endswith(("_animatediff", "_modelscope"))] + [
    "controllable_video_generation_with_controlnet_and_animatediff",
    "controllable_video_generation_with_controlnet_and_modelscope",
    "video_inpainting_with_stable_diffusion_inpainting_and_animatediff",
]


@pytest.mark.parametrize("name", TINY_RUNS)
def test_tiny_run_writes_a_complete_run_folder(name, tmp_path, capsys):
    code, out, err = run_cli(capsys, "run", "--tiny", "--config-name", name, "--output-dir", tmp_path, *FAST)
    assert code == 0, err
    assert "TINY MODE" in out and "noise" in out
    folder = only_run_folder(tmp_path)
    assert folder.name.startswith(name + "-")

    data = stats(folder)
    assert data["tiny"] is True and "noise" in data["note"]
    assert (data["config"], data["idm"], data["vdm"]) == (name, *name_models(name))
    assert data["video"]["frames"] == NUM_FRAMES and data["video"]["fps"] == pytest.approx(SHIPPED_FPS)
    assert set(data["seconds"]) >= {"conditions", "load_models", "pipeline", "write_outputs", "total"}
    assert data["peak_memory"]["kind"] == "process_peak_rss" and data["peak_memory"]["bytes"] > 0
    stage_names = [s["stage"] for s in data["stages"]]
    assert {"frame-wise generation", "temporal smoothing"} <= set(stage_names)
    assert all("network_calls" in s and "seconds" in s for s in data["stages"])
    assert data["unet_calls_total"] == sum(sum(c.values()) for c in data["unet_calls"].values()) > 0
    if name in EXPECTED_CALLS:
        assert data["unet_calls"] == EXPECTED_CALLS[name]

    videos = [stem for stem in data["files"] if stem not in ("config", "stats")]
    assert {"source_video", "video_by_idm", "video_by_bivdiff", "comparison"} <= set(videos)
    for stem in videos:
        for suffix in (".mp4", ".gif"):
            clip = read_video_clip(folder / f"{stem}{suffix}")
            assert len(clip.frames) == NUM_FRAMES, (stem, suffix)
            assert clip.fps == pytest.approx(SHIPPED_FPS, rel=0.02), (stem, suffix)
    assert read_video(folder / "video_by_bivdiff.mp4")[0].size == (32, 32)
    comparison = read_video(folder / "comparison.mp4")[0]
    assert comparison.width > 3 * 32  # source | condition or mask | image model | bivdiff, enlarged with labels
    assert (folder / "TINY_MODE_NOISE.txt").is_file()
    header = (folder / "config.yaml").read_text().splitlines()[1]
    assert "bivdiff run --tiny --config config.yaml Model.width=32" in header
    rerun = load_config(folder / "config.yaml", data["overrides"], tiny=True, name=name)
    assert rerun.data == load_config(shipped.config_path(name), data["overrides"], tiny=True, name=name).data


def name_models(name: str) -> tuple[str, str]:
    config = load_config(shipped.config_path(name), name=name)
    return config.idm, config.vdm


def test_tiny_depth_config_stands_canny_in_for_the_annotator(tmp_path, capsys):
    name = "controllable_video_generation_with_controlnet_and_vidrd"
    code, _, err = run_cli(capsys, "run", "--tiny", "--config-name", name, "--output-dir", tmp_path, *FAST)
    assert code == 0, err
    folder = only_run_folder(tmp_path)
    assert (folder / "canny_condition.mp4").is_file() and not (folder / "depth_midas_condition.mp4").exists()


# ----------------------------------------------------------------------------------------------------------
# Run folders


def staged_run(root, name, now):
    folder = staging_folder(root, name, now)
    (folder / "config.yaml").write_text("")
    return folder


def test_staging_folder_is_hidden_until_published(tmp_path):
    folder = staging_folder(tmp_path, "task")
    umask = os.umask(0)
    os.umask(umask)
    # As readable as any folder the user makes, not private as tempfile makes it.
    assert folder.name.startswith(".task-") and folder.stat().st_mode & 0o777 == 0o777 & ~umask
    (folder / "stats.json").write_text("{}")
    published = publish_run_folder(folder)
    assert [p.name for p in tmp_path.iterdir()] == [published.name] and (published / "stats.json").exists()


def test_two_runs_in_the_same_second_get_two_folders(tmp_path):
    now = datetime(2024, 6, 1, 12, 0, 0)
    first, second = (publish_run_folder(staged_run(tmp_path, "task", now)) for _ in range(2))
    assert first != second and first.name == "task-20240601-120000" and second.name == "task-20240601-120000-1"


def test_concurrent_runs_never_share_a_folder(tmp_path):
    now, folders = datetime(2024, 6, 1, 12, 0, 0), []
    def run():
        folders.append(publish_run_folder(staged_run(tmp_path, "t", now)))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(folders)) == 8 and all(f.is_dir() for f in folders)


# ----------------------------------------------------------------------------------------------------------
# Errors before anything runs


def test_unknown_override_key_is_named_and_nothing_is_written(tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "run",
        "--tiny",
        "--config-name",
        CONTROLNET_ZEROSCOPE,
        "--output-dir",
        tmp_path,
        "Model.num_inference_step=3",
    )
    assert code == 2
    assert "'Model.num_inference_step'" in err and "Model.num_inference_steps" in err
    assert not any(tmp_path.iterdir())


def test_too_few_source_frames_gives_the_numbers_and_the_fix(tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "run",
        "--tiny",
        "--config-name",
        CONTROLNET_ZEROSCOPE,
        "--output-dir",
        tmp_path,
        "Model.video_length=100",
    )
    assert code == 2
    assert "Model.video_path" in err and "has 132 frames" in err and "Model.video_length=100" in err
    assert "Model.frame_rate=1" in err
    assert not any(tmp_path.iterdir())


def test_missing_input_video_is_named(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--tiny", CONTROLNET_ZEROSCOPE, f"Model.video_path={tmp_path}/none.mp4")
    assert code == 2 and "Model.video_path: no file or folder at" in err


def test_unreadable_input_video_is_named_in_one_line(tmp_path, capsys):
    (tmp_path / "broken.mp4").write_bytes(b"\x00not a video" * 100)
    video = f"Model.video_path={tmp_path}/broken.mp4"
    code, _, err = run_cli(capsys, "run", "--tiny", CONTROLNET_ZEROSCOPE, video)
    assert code == 2 and err.startswith("error: Model.video_path: Cannot read video frames from")
    assert "Check that the file is a complete video" in err and len(err.splitlines()) == 1
    assert "ffmpeg version" not in err and "In config terms" not in err


def test_unknown_config_name_suggests_the_shipped_one(capsys):
    code, _, err = run_cli(capsys, "run", "--tiny", "--config-name", "controlnet_and_zeroscope")
    assert code == 2 and CONTROLNET_ZEROSCOPE in err


def test_no_config_lists_the_shipped_ones(capsys):
    code, _, err = run_cli(capsys, "run", "--tiny")
    assert code == 2 and all(name in err for name in shipped.config_names())


def test_dry_run_checks_and_writes_nothing(tmp_path, capsys):
    code, out, _ = run_cli(
        capsys, "run", "--tiny", "--dry-run", CONTROLNET_ZEROSCOPE, "--output-dir", tmp_path, "Model.frame_stride=2"
    )
    assert code == 0 and "Dry run" in out and "every 2 from frame 0" in out
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------
# Help and listing


def test_main_help_names_the_commands_and_a_first_command(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert all(word in out for word in ("run", "list", "eval", "--tiny", "noise"))


def test_run_help_explains_configs_overrides_and_models(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, "run", "--help")
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    expected = ("--config-name", "--tiny", "--checkpoints", "--offline", "Model.num_inference_steps=20", "stats.json")
    for text in expected:
        assert text in out


def test_list_shows_every_config_with_its_description(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for name in shipped.config_names():
        assert name in out and shipped.config_description(name) in out


def test_unknown_command_is_refused(capsys):
    code, _, err = run_cli(capsys, "render")
    assert code == 2 and "run, batch, list, eval or demo" in err


def test_demo_without_gradio_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if it were not installed
    code, _, err = run_cli(capsys, "demo", "--tiny")
    assert code == 1 and 'pip install "bivdiff[demo]"' in err


def test_console_script_runs(tmp_path):
    script = Path(sys.executable).with_name("bivdiff")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run(
        [str(script), "run", "--tiny", "--dry-run", "--config-name", CONTROLNET_ZEROSCOPE],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "TINY MODE" in result.stdout and "Dry run" in result.stdout


def test_video_window_runs_the_video_model_on_windows(tmp_path, capsys):
    # 3 frames in windows of 2 overlapping by 1: two video-UNet calls per smoothing step.
    code, _, err = run_cli(
        capsys,
        "run",
        "--tiny",
        "--config-name",
        CONTROLNET_ZEROSCOPE,
        "--output-dir",
        tmp_path,
        *FAST,
        "Model.video_window=2",
        "Model.video_window_overlap=1",
    )
    assert code == 0, err
    calls = stats(only_run_folder(tmp_path))["unet_calls"]
    assert calls["temporal smoothing"] == {"video_unet": 2 * 2}


def test_video_freeu_is_the_video_unets_own_and_a_reused_pipeline_drops_it():
    import numpy as np
    import torch

    from bivdiff.runner import build_pipeline, call_arguments, plan_run, run_job

    freeu = [0.9, 0.2, 1.2, 1.4]
    plain = plan_run(CONTROLNET_ZEROSCOPE, FAST, tiny=True)
    with_freeu = plan_run(CONTROLNET_ZEROSCOPE, [*FAST, "Model.video_freeu=[0.9,0.2,1.2,1.4]"], tiny=True)
    assert with_freeu.config.model["video_freeu"] == freeu
    assert with_freeu.model_set == plain.model_set  # a batch runs both jobs on one pipeline

    def video(output) -> np.ndarray:
        return np.stack([np.asarray(frame) for frame in output.frames[0]])

    pipe = build_pipeline(with_freeu)
    by_key, then_plain = (video(run_job(pipe, plan)[0]) for plan in (with_freeu, plain))
    # Oracles: a pipeline that never had FreeU, then the same with FreeU enabled on its video UNet from Python.
    fresh = build_pipeline(plain)
    never = video(fresh(**call_arguments(plain, torch.Generator("cpu").manual_seed(42))))
    fresh.video_unet.enable_freeu(*freeu)
    by_python = video(fresh(**call_arguments(with_freeu, torch.Generator("cpu").manual_seed(42))))
    np.testing.assert_array_equal(then_plain, never)
    np.testing.assert_array_equal(by_key, by_python)
    assert np.abs(by_key.astype(int) - never).max() > 0


# ----------------------------------------------------------------------------------------------------------
# The same pass from Python (what a web demo calls)


def test_run_config_reports_progress_and_returns_the_run_folder(tmp_path):
    from bivdiff.runner import run_config

    steps = []
    folder = run_config(
        CONTROLNET_ZEROSCOPE, FAST, tiny=True, output_dir=tmp_path, progress=lambda *step: steps.append(step)
    )
    assert folder == only_run_folder(tmp_path) and (folder / "video_by_bivdiff.mp4").is_file()
    assert steps == [(1, 2), (2, 2)]  # after each of the 2 smoothing steps


def test_run_config_raises_the_command_lines_errors(tmp_path, capsys):
    from bivdiff.errors import ConfigError
    from bivdiff.runner import run_config

    with pytest.raises(ConfigError) as err:
        run_config(CONTROLNET_ZEROSCOPE, ["Model.num_inference_step=3"], tiny=True, output_dir=tmp_path)
    code, _, printed = run_cli(capsys, "run", "--tiny", CONTROLNET_ZEROSCOPE, "Model.num_inference_step=3")
    assert code == 2 and printed == f"error: {err.value}\n"
    assert not any(tmp_path.iterdir())


def test_pndm_from_a_ddim_config_samples_like_sd15s_own_pndm():
    from diffusers import DDIMScheduler, PNDMScheduler

    from bivdiff.runner import make_scheduler

    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    pndm = make_scheduler("PNDM", dict(ddim.config))
    sd15 = PNDMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, skip_prk_steps=True
    )
    assert isinstance(pndm, PNDMScheduler) and pndm.config.skip_prk_steps
    for steps in (2, 50):
        pndm.set_timesteps(steps)
        sd15.set_timesteps(steps)
        assert pndm.timesteps.tolist() == sd15.timesteps.tolist()
