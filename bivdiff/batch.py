"""Batches: a JOBS file of runs, each into its own run folder under one batch folder.

Every job is planned (config, inputs, models checked) before any model loads; jobs are ordered by model set so one
loaded pipeline serves every job that shares it (`runner.PipelineCache`); under `accelerate launch` accelerate's
`PartialState` splits the jobs between the processes, one device each. A ledger (`ledger.jsonl`, one JSON line per
finished or failed job) makes a batch resumable: a job killed mid-run has no record and no published run folder,
so `--resume` runs it again and skips the finished ones.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bivdiff.errors import ConfigError, UserError

LEDGER = "ledger.jsonl"
LOCK = ".batch.lock"
JOB_KEYS = ("id", "config", "overrides")
# A job id names its run folder inside the batch folder: one plain path component, never `..` or absolute.
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
REASON_WIDTH = 100


@dataclass
class Job:
    id: str
    config: str
    overrides: list[str] = field(default_factory=list)


def read_jobs(path: str | os.PathLike) -> list[Job]:
    """The jobs of a YAML file (a list of jobs, or a mapping with a `jobs:` list) or a JSON-lines file (`.jsonl`,
    one job per line). Each job: `config` (a shipped name or a YAML path), optional `overrides` (a list of
    `KEY=VALUE` or a mapping) and optional `id` (default `job-001`, ...). Every problem is reported at once."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"JOBS: no file at {path}: give a YAML or JSON-lines file of jobs (bivdiff batch --help).")
    import yaml

    json_lines = path.suffix in (".jsonl", ".ndjson")
    try:
        text = path.read_text(encoding="utf-8")
        lines = [line for line in text.splitlines() if line.strip()]
        entries = [json.loads(line) for line in lines] if json_lines else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:  # UnicodeDecodeError and json's errors are ValueErrors
        raise ConfigError(f"JOBS: {path} is not valid {'JSON lines' if json_lines else 'YAML'}: {err}") from err
    if isinstance(entries, dict) and set(entries) == {"jobs"}:
        entries = entries["jobs"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"JOBS: {path} holds no list of jobs: write one job per item, e.g.\n{EXAMPLE_JOBS}")
    jobs, problems = [], []
    for number, entry in enumerate(entries, 1):
        job, job_problems = _job(entry, number)
        jobs.append(job)
        problems += [f"job {number}: {problem}" for problem in job_problems]
    seen = {}
    for number, job in enumerate(jobs, 1):
        if job.id in seen:
            problems.append(f"job {number}: id {job.id!r} is also job {seen[job.id]}'s: give every job its own id.")
        seen.setdefault(job.id, number)
    if problems:
        raise ConfigError(f"JOBS: {path} has {len(problems)} problem(s); nothing ran:\n  " + "\n  ".join(problems))
    return jobs


def _job(entry, number: int) -> tuple[Job, list[str]]:
    if not isinstance(entry, dict):
        return Job(f"job-{number:03d}", ""), [f"{entry!r} is not a mapping with a `config` key."]
    problems = [f"unknown key {key!r}: a job has only {', '.join(JOB_KEYS)}." for key in entry if key not in JOB_KEYS]
    config = entry.get("config")
    if not isinstance(config, str) or not config.strip():
        problems.append("no `config`: give a shipped config name or a YAML path, e.g. config: " + FIRST_CONFIG)
    overrides = entry.get("overrides") or []
    if isinstance(overrides, dict):
        overrides = [f"{key}={_value(value)}" for key, value in overrides.items()]
    if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
        problems.append("`overrides` must be a list of KEY=VALUE strings or a mapping of dotted keys to values.")
        overrides = []
    job_id = entry.get("id", f"job-{number:03d}")
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        problems.append(
            f"id {job_id!r} is not a plain folder name (it would escape the output folder or hide there): use "
            "letters, digits, '.', '_' and '-', starting with a letter or digit."
        )
        job_id = f"job-{number:03d}"
    return Job(job_id, config if isinstance(config, str) else "", list(overrides)), problems


def _value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


FIRST_CONFIG = "controllable_video_generation_with_controlnet_and_zeroscope"
EXAMPLE_JOBS = f"""\
  - id: bear-canny
    config: {FIRST_CONFIG}
    overrides: {{Model.video_path: bear.mp4, Model.seed: 1}}
  - config: video_editing_with_instruct_pix2pix_and_zeroscope"""


class Ledger:
    """`ledger.jsonl` of a batch folder: one record per job that finished or failed, the last one per id wins.

    Each record is one `os.write` of one line to a file opened with O_APPEND, then fsync'd: processes appending at
    once never interleave, and a crash never leaves half a record (a torn last line from a dying disk is skipped).
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LEDGER

    def append(self, record: dict) -> None:
        with open(self.path, "ab", buffering=0) as file:  # unbuffered: the line goes out in one write
            file.write((json.dumps(record, default=str) + "\n").encode())
            os.fsync(file.fileno())

    def records(self) -> dict[str, dict]:
        latest = {}
        for line in self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                latest[record["id"]] = record
        return latest


def run_batch(jobs_path: str | os.PathLike, output_dir: str | os.PathLike, overrides: Sequence[str] = (), *,
              tiny: bool = False, checkpoints: str | os.PathLike = "checkpoints", offline: bool = False,
              resume: bool = False, retry_failed: bool = False, dry_run: bool = False,
              log: Callable[[str], None] = lambda text: None) -> int:
    """Run every job of `jobs_path` into `output_dir`; returns the exit code (1 when any job failed).

    Under `accelerate launch` each process calls this and takes its share of the jobs. Bad input in a job is
    recorded as that job's failure before any model loads; a bad JOBS file raises ConfigError, nothing runs.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from bivdiff.runner import PipelineCache, plan_run

    state = PartialState(cpu=not _has_accelerator())
    jobs = read_jobs(jobs_path)
    folder = Path(output_dir).expanduser()
    say = log if state.is_main_process else (lambda text: None)
    lock, problem = None, None
    if state.is_main_process and not dry_run:
        lock, problem = _lock(folder)
    problem = broadcast_object_list([problem])[0]
    if problem:
        raise UserError(problem)
    try:
        ledger = Ledger(folder)
        earlier = ledger.records()
        if earlier and not (resume or retry_failed) and not dry_run:
            raise UserError(
                f"--output-dir {folder} already holds a batch ({len(earlier)} job(s) in {ledger.path}): add --resume "
                "to skip its finished jobs, --retry-failed to also rerun its failed ones, or choose another folder."
            )
        rerun = {"failed"} if retry_failed else set()
        todo = [job for job in jobs if job.id not in earlier or earlier[job.id]["status"] in rerun]
        plans, invalid = {}, {}
        with state.main_process_first():
            for job in todo:
                try:
                    plans[job.id] = plan_run(job.config, [*overrides, *job.overrides], tiny, checkpoints, offline,
                                             download=not dry_run)
                except UserError as err:
                    invalid[job.id] = str(err)
        if invalid:
            say(f"{len(invalid)} of {len(jobs)} job(s) refused before any model loads:")
            for job_id, message in invalid.items():
                say(f"  {job_id}: " + message.replace("\n", "\n    "))
        if dry_run:
            say(f"Dry run: {len(plans)} job(s) ready, {len(invalid)} refused; nothing was run.")
            return 1 if invalid else 0
        if state.is_main_process:
            for job_id, message in invalid.items():
                ledger.append(_record(job_id, "failed", None, 0.0, message, state.process_index))
        state.wait_for_everyone()
        # Jobs sharing a model set run back to back, so each process builds each set it meets once.
        order = {plan.model_set: None for plan in plans.values()}
        order = {model_set: index for index, model_set in enumerate(order)}
        ready = sorted(plans, key=lambda job_id: order[plans[job_id].model_set])
        say(f"{len(ready)} job(s) to run on {state.num_processes} process(es), {len(order)} model set(s).")
        pipelines = PipelineCache()
        with state.split_between_processes(ready) as mine:
            for job_id in mine:
                _run_one(job_id, plans.pop(job_id), folder, pipelines, state, ledger, log)
        pipelines.clear()
        state.wait_for_everyone()
        final = ledger.records()
        say(summary(jobs, final, earlier, rerun))
        # The main process alone reports failure: a launcher stops the other processes as soon as one fails.
        failed = any(final.get(job.id, {}).get("status") != "done" for job in jobs)
        return 1 if failed and state.is_main_process else 0
    finally:
        if lock is not None:
            os.close(lock)


def _has_accelerator() -> bool:
    """Whether torch sees a GPU; without one, accelerate's processes must be told to pair up on CPU (gloo)."""
    import torch

    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def _lock(folder: Path) -> tuple[int | None, str | None]:
    """An exclusive lock on the batch folder for this batch's lifetime (released by the OS if it dies), so two
    batches never write one ledger; and, holding it, clear the staging folders of runs that were killed."""
    import fcntl

    from bivdiff.run_folder import remove_staging_folders

    if folder.exists() and not folder.is_dir():
        return None, f"--output-dir {folder} is a file: give a folder (it is created if missing)."
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None, f"Another batch is running in {folder}: wait for it, or choose another --output-dir."
    remove_staging_folders(folder)
    return fd, None


def _run_one(job_id, plan, folder: Path, pipelines, state, ledger: Ledger, log) -> None:
    from bivdiff.runner import run_plan

    started = time.perf_counter()
    # One device per process; a config naming its own device keeps it when only one process runs.
    device = state.device if state.num_processes > 1 or plan.config.model["device"] == "auto" else None
    prefix = f"[{job_id}] " if state.num_processes == 1 else f"[{state.process_index}:{job_id}] "
    log(f"{prefix}{plan.config.name}")
    try:
        run_folder = run_plan(plan, output_root=folder, name=job_id, pipelines=pipelines, device=device,
                              log=lambda text: log(prefix + text.replace("\n", "\n" + prefix)), started=started)
        record = _record(job_id, "done", run_folder, time.perf_counter() - started, None, state.process_index)
    except Exception as err:
        message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        run_folder = getattr(err, "run_folder", None)
        record = _record(job_id, "failed", run_folder, time.perf_counter() - started, message, state.process_index)
        log(f"{prefix}failed: {one_line(message)}")
    if record["run_folder"]:
        record["run_folder"] = os.path.relpath(record["run_folder"], folder)
    ledger.append(record)


def _record(job_id, status, run_folder, seconds, error, process) -> dict:
    return dict(id=job_id, status=status, run_folder=run_folder and str(run_folder), seconds=round(seconds, 3),
                error=error, process=process, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))


def one_line(message: str | None) -> str:
    text = " ".join((message or "").split())
    return text if len(text) <= REASON_WIDTH else text[: REASON_WIDTH - 3] + "..."


def summary(jobs: list[Job], final: dict, earlier: dict, rerun: set) -> str:
    """The table printed at the end: every job, what happened to it in this batch, and why a job failed."""
    rows, counts = [], {"done": 0, "failed": 0, "skipped": 0}
    for job in jobs:
        record = final.get(job.id, {"status": "failed", "error": "no record (its process died?): rerun with --resume"})
        skipped = job.id in earlier and earlier[job.id]["status"] not in rerun
        status = "skipped" if skipped else record["status"]
        counts[status] += 1
        if skipped:
            why = "finished earlier" if record["status"] == "done" else "failed earlier (--retry-failed reruns it)"
        else:
            why = (record.get("run_folder") or "") if status == "done" else one_line(record.get("error"))
        rows.append((job.id, status, f"{record.get('seconds', 0):.1f}", why))
    rows.insert(0, ("job", "status", "seconds", "run folder / reason"))
    width = max(len(row[0]) for row in rows)
    lines = [f"{a:<{width}}  {b:<7}  {c:>7}  {d}" for a, b, c, d in rows]
    return "\n".join([*lines, ", ".join(f"{n} {what}" for what, n in counts.items())])


METRICS = ("frame_difference", "warp_error", "clip_frame_consistency", "clip_text_alignment")


def evaluate_batch(folder: str | os.PathLike, clip_path: str | os.PathLike | None = None,
                   log: Callable[[str], None] = lambda text: None) -> tuple[Path, Path]:
    """Score every finished job's video (`evaluation.evaluate_video`, the warp following the source's motion, CLIP
    text alignment against the job's video prompt) into `eval.csv` and `eval.md` in the batch folder, the latter
    with the means per task; returns both paths."""
    import yaml

    from bivdiff.evaluation import evaluate_video
    from bivdiff.run_folder import write_text

    folder = Path(folder).expanduser()
    done = [r for r in Ledger(folder).records().values() if r["status"] == "done"]
    if not done:
        raise UserError(f"{folder} has no finished batch job ({LEDGER} lists none): run bivdiff batch first.")
    rows = []
    for record in done:
        run = folder / record["run_folder"]
        if not (run / "video_by_bivdiff.mp4").is_file():
            log(f"{record['id']}: no video in {run}; left out")
            continue
        stats = json.loads((run / "stats.json").read_text())
        config = yaml.safe_load((run / "config.yaml").read_text())
        log(f"{record['id']}: scoring {run.name}")
        scores = evaluate_video(run / "video_by_bivdiff.mp4", source=run / "source_video.mp4",
                                prompt=config["Model"].get("vdm_prompt") or None, clip_path=clip_path)
        rows.append({"id": record["id"], "task": stats["task"], "config": stats["config"],
                     "run_folder": record["run_folder"], **{m: scores.get(m) for m in METRICS}})
    if not rows:
        raise UserError(f"None of the finished jobs in {folder} still has its video: nothing to score.")
    metrics = [m for m in METRICS if any(row[m] is not None for row in rows)]
    columns = ["id", "task", "config", *metrics, "run_folder"]
    csv_path, md_path = folder / "eval.csv", folder / "eval.md"
    sink = io.StringIO()
    writer = csv.DictWriter(sink, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(csv_path, sink.getvalue())
    tasks = {row["task"]: [r for r in rows if r["task"] == row["task"]] for row in rows}
    means = [{"task": task, "jobs": len(group), **{m: _mean([r[m] for r in group]) for m in metrics}}
             for task, group in tasks.items()]
    text = "# Scores per job\n\n" + _markdown(rows, ["id", "task", *metrics])
    text += "\n# Means per task\n\n" + _markdown(means, ["task", "jobs", *metrics])
    write_text(md_path, text)
    return csv_path, md_path


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
