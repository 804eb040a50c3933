"""`bivdiff batch`: a JOBS file checked whole before any model loads, one pipeline per model set, a ledger that makes
a batch resumable after a failure or a SIGKILL, two processes under `accelerate launch` on CPU, and `bivdiff eval`
over a batch folder. Everything runs tiny models offline."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_helpers import FAST, run_cli, save_tiny_checkpoints

import bivdiff.runner as runner
from bivdiff.batch import Ledger, read_jobs
from bivdiff.errors import ConfigError
from bivdiff.evaluation import evaluate_video
from bivdiff.video_io import default_clip_path, read_video

CONTROLNET = "controllable_video_generation_with_controlnet_and_zeroscope"
ADAPTER = "controllable_video_generation_with_t2iadapter_and_vidrd"
ROOT = Path(__file__).resolve().parents[1]


def write_jobs(path: Path, jobs) -> Path:
    lines = "".join(json.dumps(job) + "\n" for job in jobs)
    path.write_text(lines if path.suffix == ".jsonl" else yaml.safe_dump(jobs, sort_keys=False))
    return path


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "ledger.jsonl").read_text().splitlines()]


def published(folder: Path) -> list[str]:
    """The run folders, not the hidden staging folders of unfinished runs."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.fixture
def counted_builds(monkeypatch):
    """Every pipeline the runner builds, in order."""
    built = []
    build = runner.build_pipeline

    def counting(plan, *args):
        built.append(plan.config.name)
        return build(plan, *args)

    monkeypatch.setattr(runner, "build_pipeline", counting)
    return built


# ----------------------------------------------------------------------------------------------------------
# The JOBS file


def test_every_problem_of_a_jobs_file_is_reported_at_once(tmp_path):
    path = write_jobs(tmp_path / "jobs.yaml", [
        {"id": "../escape", "config": CONTROLNET},
        {"config": CONTROLNET, "prompt": "a fox"},
        {"id": "twice", "config": CONTROLNET},
        {"id": "twice", "config": ADAPTER},
        {"id": "no-config"},
        {"config": CONTROLNET, "overrides": "Model.seed=1"},
        "just a string",
    ])
    with pytest.raises(ConfigError) as err:
        read_jobs(path)
    message = str(err.value)
    assert "6 problem(s)" in message and "nothing ran" in message
    for expected in ("job 1: id '../escape' is not a plain folder name (it would escape the output folder",
                     "job 2: unknown key 'prompt': a job has only id, config, overrides",
                     "job 4: id 'twice' is also job 3's", "job 5: no `config`",
                     "job 6: `overrides` must be a list", "job 7: 'just a string' is not a mapping"):
        assert expected in message


@pytest.mark.parametrize("job_id", ["/abs/path", "a/b", "..", ".hidden", "", "x" * 101])
def test_ids_that_are_not_one_plain_folder_name_are_refused(tmp_path, job_id):
    with pytest.raises(ConfigError, match="not a plain folder name"):
        read_jobs(write_jobs(tmp_path / "jobs.yaml", [{"id": job_id, "config": CONTROLNET}]))


def test_json_lines_and_yaml_give_the_same_jobs(tmp_path):
    jobs = [{"config": CONTROLNET, "overrides": {"Model.seed": 3, "Model.idm_prompt": "a: b, c"}},
            {"id": "second", "config": ADAPTER, "overrides": ["Model.seed=4"]}]
    from_yaml = read_jobs(write_jobs(tmp_path / "jobs.yaml", jobs))
    assert from_yaml == read_jobs(write_jobs(tmp_path / "jobs.jsonl", jobs))
    assert [job.id for job in from_yaml] == ["job-001", "second"]
    assert from_yaml[0].overrides == ["Model.seed=3", "Model.idm_prompt=a: b, c"]


@pytest.mark.parametrize("text, message", [
    ("- config: [unclosed\n", "is not valid YAML"),
    ("{}\n", "holds no list of jobs"),
])
def test_unparsable_jobs_files_are_refused_without_a_traceback(tmp_path, capsys, text, message):
    (tmp_path / "jobs.yaml").write_text(text)
    code, _, err = run_cli(capsys, "batch", tmp_path / "jobs.yaml", "--output-dir", tmp_path / "out", "--tiny")
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_json_line_and_missing_jobs_file_are_named(tmp_path, capsys):
    (tmp_path / "jobs.jsonl").write_text('{"config": "x"}\n{"config": \n')
    code, _, err = run_cli(capsys, "batch", tmp_path / "jobs.jsonl", "--output-dir", tmp_path / "out")
    assert code == 2 and "is not valid JSON lines" in err
    code, _, err = run_cli(capsys, "batch", tmp_path / "none.yaml", "--output-dir", tmp_path / "out")
    assert code == 2 and "JOBS: no file at" in err


def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"config": CONTROLNET}])
    (tmp_path / "out").write_text("")
    code, _, err = run_cli(capsys, "batch", jobs, "--output-dir", tmp_path / "out", "--tiny", *FAST)
    assert code == 1 and "is a file: give a folder" in err


def test_every_invalid_job_is_reported_before_any_model_loads(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built while the batch still had jobs to check")

    monkeypatch.setattr(runner, "build_pipeline", refuse)
    jobs = write_jobs(tmp_path / "jobs.yaml", [
        {"id": "width", "config": CONTROLNET, "overrides": ["Model.width=500"]},
        {"id": "video", "config": CONTROLNET, "overrides": [f"Model.video_path={tmp_path}/none.mp4"]},
        {"id": "name", "config": "controlnet_zeroscope"},
    ])
    code, out, err = run_cli(capsys, "batch", jobs, "--output-dir", tmp_path / "out", "--tiny", "--dry-run", *FAST)
    assert code == 1 and "3 of 3 job(s) refused before any model loads" in out
    assert "width: " in out and "not a multiple of 8" in out and "no file or folder at" in out
    assert f"Did you mean: {CONTROLNET}" in out and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# One process: model reuse, failures, the ledger, resume


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A batch of two ControlNet jobs (one model set), a job refused for bad input and a job that runs out of
    memory; the pipeline builds are counted."""
    import torch

    tmp = tmp_path_factory.mktemp("batch")
    jobs = write_jobs(tmp / "jobs.yaml", [
        {"id": "first", "config": CONTROLNET},
        {"id": "broken", "config": CONTROLNET, "overrides": {"IDM.ControlNet.condition_video": str(tmp / "none.mp4")}},
        {"id": "second", "config": CONTROLNET, "overrides": {"Model.seed": 1}},
        {"id": "oom", "config": CONTROLNET, "overrides": {"Model.seed": 7}},
    ])
    built, build, run_job = [], runner.build_pipeline, runner.run_job

    def counting(plan, *args):
        built.append(plan.config.name)
        return build(plan, *args)

    def out_of_memory(pipe, plan, progress=None):
        if plan.config.model["seed"] == 7:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return run_job(pipe, plan, progress)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "build_pipeline", counting)
        patch.setattr(runner, "run_job", out_of_memory)
        from bivdiff.cli import main

        code = main(["batch", str(jobs), "--output-dir", str(tmp / "out"), "--tiny", *FAST])
    return dict(code=code, folder=tmp / "out", jobs=jobs, built=built)


def test_one_model_set_is_built_once_and_failures_do_not_stop_the_batch(batch):
    assert batch["code"] == 1 and batch["built"] == [CONTROLNET]
    ledger = {r["id"]: r for r in records(batch["folder"])}
    assert set(ledger) == {"first", "broken", "second", "oom"} and len(records(batch["folder"])) == 4
    assert ledger["first"]["status"] == ledger["second"]["status"] == "done"
    assert "IDM.ControlNet.condition_video: no file or folder at" in ledger["broken"]["error"]
    assert ledger["broken"]["run_folder"] is None
    message = ledger["oom"]["error"]
    assert message.startswith("Out of memory") and "20.00 GiB" in message
    for lever in ("Model.frame_batch_size", "Model.decode_chunk_size", "Model.cpu_offload", "Model.video_window"):
        assert lever in message
    assert (batch["folder"] / ledger["oom"]["run_folder"] / "error.txt").exists()
    assert len(published(batch["folder"])) == 3 and not list(batch["folder"].glob(".*partial*"))
    assert all((batch["folder"] / ledger[i]["run_folder"] / "stats.json").exists() for i in ("first", "second"))


def test_a_job_on_a_reused_pipeline_equals_its_own_run(batch, tmp_path, capsys):
    """The oracle: `bivdiff run` of the second job, with a pipeline of its own."""
    code, _, err = run_cli(capsys, "run", "--tiny", CONTROLNET, "Model.seed=1", "--output-dir", tmp_path, *FAST)
    assert code == 0, err
    (alone,) = tmp_path.iterdir()
    second = {r["id"]: r for r in records(batch["folder"])}["second"]["run_folder"]
    in_batch = read_video(batch["folder"] / second / "video_by_bivdiff.gif")
    assert np.array_equal(np.stack(in_batch), np.stack(read_video(alone / "video_by_bivdiff.gif")))


def test_a_new_model_set_loads_only_the_models_it_does_not_share(tmp_path, capsys, monkeypatch):
    """Two jobs on one set of saved models, whose model sets differ by the stage-1 sampler: the second pipeline is
    built from the first one's models, none read again."""
    checkpoints = save_tiny_checkpoints(tmp_path / "checkpoints")
    built, build = [], runner.build_pipeline

    def keep(*args):
        built.append(build(*args))
        return built[-1]

    monkeypatch.setattr(runner, "build_pipeline", keep)
    other_sampler = {"config": CONTROLNET, "overrides": ["IDM.ControlNet.scheduler=EulerAncestral"]}
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"config": CONTROLNET}, other_sampler])
    code, out, err = run_cli(capsys, "batch", jobs, "--output-dir", tmp_path / "out", "--checkpoints", checkpoints,
                             "--offline", *FAST)
    assert code == 0, out + err
    first, second = built
    samplers = [type(pipe.scheduler).__name__ for pipe in built]
    assert samplers == ["DDIMScheduler", "EulerAncestralDiscreteScheduler"]
    for name in ("vae", "text_encoder", "unet", "controlnet", "video_unet", "video_text_encoder"):
        assert getattr(second, name) is getattr(first, name), name


def test_a_second_batch_in_the_same_folder_needs_resume(batch, capsys):
    code, _, err = run_cli(capsys, "batch", batch["jobs"], "--output-dir", batch["folder"], "--tiny", *FAST)
    assert code == 1 and "already holds a batch (4 job(s)" in err and "--resume" in err


def test_resume_skips_finished_and_failed_jobs_and_retry_failed_reruns_the_failed(batch, tmp_path, capsys,
                                                                                  counted_builds):
    folder = tmp_path / "out"
    shutil.copytree(batch["folder"], folder)
    before = published(folder)
    code, out, _ = run_cli(capsys, "batch", batch["jobs"], "--output-dir", folder, "--resume", "--tiny", *FAST)
    assert code == 1 and counted_builds == [] and published(folder) == before
    assert "0 done, 0 failed, 4 skipped" in out and "failed earlier (--retry-failed reruns it)" in out

    # The failed jobs' causes fixed (a condition video, enough memory), only they run again.
    shutil.copy(default_clip_path(), batch["jobs"].parent / "none.mp4")
    code, out, _ = run_cli(capsys, "batch", batch["jobs"], "--output-dir", folder, "--retry-failed", "--tiny", *FAST)
    assert code == 0, out
    assert counted_builds == [CONTROLNET] and "2 done, 0 failed, 2 skipped" in out
    latest = Ledger(folder).records()
    assert all(record["status"] == "done" for record in latest.values()) and len(records(folder)) == 6
    assert len(published(folder)) == 5


def test_eval_of_a_batch_writes_a_csv_and_a_table_with_means_per_task(batch, capsys):
    code, out, err = run_cli(capsys, "eval", batch["folder"])
    assert code == 0, err
    rows = (batch["folder"] / "eval.csv").read_text().splitlines()
    assert rows[0] == "id,task,config,frame_difference,warp_error,run_folder" and len(rows) == 3
    ledger = Ledger(batch["folder"]).records()
    first = batch["folder"] / ledger["first"]["run_folder"]
    oracle = evaluate_video(first / "video_by_bivdiff.mp4", source=first / "source_video.mp4")
    values = {row.split(",")[0]: row.split(",") for row in rows[1:]}
    assert float(values["first"][3]) == pytest.approx(oracle["frame_difference"])
    assert float(values["first"][4]) == pytest.approx(oracle["warp_error"])
    table = (batch["folder"] / "eval.md").read_text()
    mean = (float(values["first"][3]) + float(values["second"][3])) / 2
    assert "# Means per task" in table and f"| 2 | {mean:.4f} |" in table and "| first |" in out


# ----------------------------------------------------------------------------------------------------------
# Other processes: a SIGKILL mid-job, accelerate launch with two CPU processes


def subprocess_env() -> dict:
    # One thread per process: the suite's processes share two cores.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}


def test_a_job_killed_mid_run_leaves_no_run_folder_and_resume_reruns_only_it(tmp_path, capsys, counted_builds):
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"id": "kept", "config": CONTROLNET},
                                               {"id": "killed", "config": CONTROLNET, "overrides": ["Model.seed=1"]}])
    folder = tmp_path / "out"
    command = [sys.executable, "-m", "bivdiff", "batch", str(jobs), "--output-dir", str(folder), "--tiny", *FAST]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(folder.glob(".killed-*")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, "the batch ended before its second job started"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    kept = published(folder)
    assert [r["id"] for r in records(folder)] == ["kept"] and len(kept) == 1 and kept[0].startswith("kept-")
    assert list(folder.glob(".killed-*"))  # the dead run's staging folder, never mistaken for a run

    code, out, _ = run_cli(capsys, "batch", jobs, "--output-dir", folder, "--resume", "--tiny", *FAST)
    assert code == 0 and counted_builds == [CONTROLNET] and "1 done, 0 failed, 1 skipped" in out
    assert [r["id"] for r in records(folder)] == ["kept", "killed"] and not list(folder.glob(".*partial*"))
    assert published(folder)[0] == kept[0] and len(published(folder)) == 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accelerate_launch_with_two_cpu_processes_finishes_the_jobs_beside_a_broken_one(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "one", "config": CONTROLNET},
        {"id": "broken", "config": CONTROLNET, "overrides": ["Model.frame_batch_size=0"]},
        {"id": "two", "config": CONTROLNET, "overrides": ["Model.seed=1"]},
    ])
    folder = tmp_path / "out"
    # Without a GPU, --multi_gpu is how accelerate starts several processes (torchrun); they pair up on CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    result = subprocess.run(
        [*launch, "-m", "bivdiff", "batch", str(jobs), "--output-dir", str(folder), "--tiny", *FAST],
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    ledger = records(folder)
    assert sorted(r["id"] for r in ledger) == ["broken", "one", "two"]  # every job once: none taken twice
    done = [r for r in ledger if r["status"] == "done"]
    assert sorted(r["process"] for r in done) == [0, 1]
    assert "Model.frame_batch_size=0" in {r["id"]: r for r in ledger}["broken"]["error"]
    assert "2 done, 1 failed, 0 skipped" in result.stdout and "2 job(s) to run on 2 process(es)" in result.stdout
