"""Batches: a JOBS file of runs, each into its own run folder under one batch folder.

Every job is planned (config, inputs, models checked) before any model loads; jobs are ordered by model set so one
loaded pipeline serves every job that shares it (`runner.PipelineCache`); under `accelerate launch` accelerate's
`PartialState` splits the jobs between the processes, one device each. A ledger (`ledger.jsonl`, one JSON line per
finished or failed job) makes a batch resumable: a job killed mid-run has no record and no published run folder,
so `--resume` runs it again and skips the finished ones."""

import contextlib
import csv
import io
import json
import os
import re
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import yaml

from bivdiff.errors import ConfigError, UserError
from bivdiff.evaluation import evaluate_video
from bivdiff.run_folder import remove_staging_folders, write_text
from bivdiff.runner import FIRST_TRY, PipelineCache, plan_run, run_plan

Job = NamedTuple("Job", [("id", str), ("config", str), ("overrides", list[str])])
LEDGER = "ledger.jsonl"
# A job id names its run folder inside the batch folder: one plain path component, never `..` or absolute.
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
METRICS = ("frame_difference", "warp_error", "clip_frame_consistency", "clip_text_alignment")
EXAMPLE_JOBS = f"""\
  - id: bear-canny
    config: {FIRST_TRY}
    overrides: {{Model.video_path: bear.mp4, Model.seed: 1}}
  - config: video_editing_with_instruct_pix2pix_and_zeroscope"""


def read_jobs(path: str | os.PathLike) -> list[Job]:
    """The jobs of a YAML file (a list of jobs, or a mapping with a `jobs:` list) or a JSON-lines file (`.jsonl`,
    one job per line). Each job: `config` (a shipped name or a YAML path), optional `overrides` (a list of
    `KEY=VALUE` or a mapping) and optional `id` (default `job-001`, ...). Every problem is reported at once."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"JOBS: no file at {path}: give a YAML or JSON-lines file of jobs (bivdiff batch --help).")
    json_lines = path.suffix in (".jsonl", ".ndjson")
    try:
        text = path.read_text(encoding="utf-8")
        entries = list(map(json.loads, filter(str.strip, text.splitlines()))) if json_lines else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:  # UnicodeDecodeError and json's errors are ValueErrors
        raise ConfigError(f"JOBS: {path} is not valid {'JSON lines' if json_lines else 'YAML'}: {err}") from err
    entries = entries["jobs"] if isinstance(entries, dict) and set(entries) == {"jobs"} else entries
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"JOBS: {path} holds no list of jobs: write one job per item, e.g.\n{EXAMPLE_JOBS}")
    jobs, problems, numbers = [], [], {}  # numbers: the first job with each id
    for number, entry in enumerate(entries, 1):
        job = entry if isinstance(entry, dict) else {}
        config, overrides, job_id = job.get("config"), job.get("overrides") or [], job.get("id", f"job-{number:03d}")
        if isinstance(overrides, dict):
            overrides = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
        found = [f"unknown key {k!r}: a job has only {', '.join(Job._fields)}." for k in job if k not in Job._fields]
        if job is not entry:
            found.append(f"{entry!r} is not a mapping with a `config` key.")
        elif not isinstance(config, str) or not config.strip():
            found.append("no `config`: give a shipped config name or a YAML path, e.g. config: " + FIRST_TRY)
        if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
            found.append("`overrides` must be a list of KEY=VALUE strings or a mapping of dotted keys to values.")
        if not (isinstance(job_id, str) and JOB_ID.match(job_id)):
            found.append(f"id {job_id!r} is not a plain folder name (it would escape the output folder or hide "
                         "there): use letters, digits, '.', '_' and '-', starting with a letter or digit.")
            job_id = f"job-{number:03d}"
        if job_id in numbers:
            found.append(f"id {job_id!r} is also job {numbers[job_id]}'s: give every job its own id.")
        numbers.setdefault(job_id, number)
        problems += [f"job {number}: {problem}" for problem in found]
        jobs.append(Job(job_id, config, overrides))  # returned only when no job has a problem
    if problems:
        raise ConfigError(f"JOBS: {path} has {len(problems)} problem(s); nothing ran:\n  " + "\n  ".join(problems))
    return jobs


class Ledger:
    """`ledger.jsonl` of a batch folder: one record per job that finished or failed, the last one per id wins. Each
    record is one `os.write` of one line to a file opened with O_APPEND, then fsync'd: processes appending at once
    never interleave, and a crash never leaves half a record (a torn last line from a dying disk is skipped)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LEDGER

    def append(self, job_id: str, status: str, seconds: float, error, process: int, run_folder=None) -> None:
        record = dict(id=job_id, status=status, run_folder=run_folder, seconds=round(seconds, 3), error=error,
                      process=process, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
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
    """Run every job of `jobs_path` into `output_dir` (under `accelerate launch`, this process's share of them);
    returns the exit code (1 when any job failed). Bad input in a job is recorded as that job's failure before any
    model loads; a bad JOBS file raises ConfigError, nothing runs."""
    import fcntl

    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, is_cuda_available, is_mps_available, is_xpu_available

    # Without an accelerator, accelerate's processes must be told to pair up on CPU (gloo).
    state = PartialState(cpu=not (is_cuda_available() or is_mps_available() or is_xpu_available()))
    jobs = read_jobs(jobs_path)
    folder = Path(output_dir).expanduser()
    say = state.on_main_process(log)  # what every process knows, said once
    with contextlib.ExitStack() as stack:
        # A lock for the batch's lifetime (the OS drops it if the batch dies): one batch at a time writes the folder.
        problem = None
        try:
            if state.is_main_process and not dry_run:
                folder.mkdir(parents=True, exist_ok=True)
                fcntl.flock(stack.enter_context(open(folder / ".batch.lock", "a")), fcntl.LOCK_EX | fcntl.LOCK_NB)
                remove_staging_folders(folder)
        except FileExistsError:
            problem = f"--output-dir {folder} is a file: give a folder (it is created if missing)."
        except BlockingIOError:
            problem = f"Another batch is running in {folder}: wait for it, or choose another --output-dir."
        if problem := broadcast_object_list([problem])[0]:
            raise UserError(problem)
        ledger = Ledger(folder)
        earlier = ledger.records()
        if earlier and not (resume or retry_failed or dry_run):
            raise UserError(f"--output-dir {folder} already holds a batch ({len(earlier)} job(s) in {ledger.path}): "
                            "add --resume to skip its finished jobs, --retry-failed to also rerun its failed ones, "
                            "or choose another folder.")
        skipped = {job_id for job_id, record in earlier.items() if not (retry_failed and record["status"] == "failed")}
        plans, invalid = {}, {}
        with state.main_process_first():
            for job in [job for job in jobs if job.id not in skipped]:
                try:
                    plans[job.id] = plan_run(job.config, [*overrides, *job.overrides], tiny, checkpoints, offline,
                                             download=not dry_run)
                except UserError as err:
                    invalid[job.id] = str(err)
        if invalid:
            say("\n".join([f"{len(invalid)} of {len(jobs)} job(s) refused before any model loads:",
                           *(f"  {job_id}: " + text.replace("\n", "\n    ") for job_id, text in invalid.items())]))
        if dry_run:
            say(f"Dry run: {len(plans)} job(s) ready, {len(invalid)} refused; nothing was run.")
            return 1 if invalid else 0
        if state.is_main_process:
            for job_id, message in invalid.items():
                ledger.append(job_id, "failed", 0.0, message, state.process_index)
        state.wait_for_everyone()
        model_sets = list(dict.fromkeys(plan.model_set for plan in plans.values()))
        ready = sorted(plans, key=lambda job_id: model_sets.index(plans[job_id].model_set))
        say(f"{len(ready)} job(s) to run on {state.num_processes} process(es), {len(model_sets)} model set(s).")
        pipelines = PipelineCache()
        for job_id in stack.enter_context(state.split_between_processes(ready)):
            plan = plans.pop(job_id)
            started = time.perf_counter()
            # One device per process; a config naming its own device keeps it when only one process runs.
            device = state.device if state.num_processes > 1 or plan.config.model["device"] == "auto" else None
            prefix = f"[{job_id}] " if state.num_processes == 1 else f"[{state.process_index}:{job_id}] "
            log(f"{prefix}{plan.config.name}")
            try:
                run_folder = run_plan(plan, output_root=folder, name=job_id, pipelines=pipelines, device=device,
                                      started=started, log=lambda text: log(textwrap.indent(text, prefix)))
                error = None
            except Exception as err:
                error = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
                run_folder = getattr(err, "run_folder", None)
                log(f"{prefix}failed: {one_line(error)}")
            ledger.append(job_id, "done" if error is None else "failed", time.perf_counter() - started, error,
                          state.process_index, run_folder and os.path.relpath(run_folder, folder))
        pipelines.clear()
        state.wait_for_everyone()
        # The main process alone reports, and fails: a launcher stops the other processes as soon as one fails.
        return summary(jobs, ledger.records(), skipped, log) if state.is_main_process else 0


def one_line(message: str | None) -> str:
    text = " ".join((message or "").split())
    return text if len(text) <= 100 else text[:97] + "..."


def summary(jobs: list[Job], final: dict, skipped: set[str], log: Callable[[str], None]) -> int:
    """Log the table of every job (what happened to it in this batch, why it failed); 1 when any job is not done."""
    rows = [("job", "status", "seconds", "run folder / reason")]
    for job in jobs:
        record = final.get(job.id, {"status": "failed", "error": "no record (its process died?): rerun with --resume"})
        done = record["status"] == "done"
        if job.id in skipped:
            status, why = "skipped", "finished earlier" if done else "failed earlier (--retry-failed reruns it)"
        else:
            status, why = record["status"], (record.get("run_folder") or "") if done else one_line(record.get("error"))
        rows.append((job.id, status, f"{record.get('seconds', 0):.1f}", why))
    width = max(len(row[0]) for row in rows)
    counts = ", ".join(f"{sum(row[1] == what for row in rows)} {what}" for what in ("done", "failed", "skipped"))
    log("\n".join([*(f"{a:<{width}}  {b:<7}  {c:>7}  {d}" for a, b, c, d in rows), counts]))
    return int(any(final.get(job.id, {}).get("status") != "done" for job in jobs))


def evaluate_batch(folder: str | os.PathLike, clip_path: str | os.PathLike | None = None,
                   log: Callable[[str], None] = lambda text: None) -> tuple[Path, Path]:
    """Score every finished job's video (`evaluation.evaluate_video`, the warp following the source's motion, CLIP
    text alignment against the job's video prompt) into `eval.csv` and `eval.md` in the batch folder, the latter
    with the means per task; returns both paths."""
    folder = Path(folder).expanduser()
    done = [record for record in Ledger(folder).records().values() if record["status"] == "done"]
    if not done:
        raise UserError(f"{folder} has no finished batch job ({LEDGER} lists none): run bivdiff batch first.")
    rows = []
    for record in done:
        run = folder / record["run_folder"]
        if not (run / "video_by_bivdiff.mp4").is_file():
            log(f"{record['id']}: no video in {run}; left out")
            continue
        stats = json.loads((run / "stats.json").read_text())
        prompt = yaml.safe_load((run / "config.yaml").read_text())["Model"].get("vdm_prompt") or None
        log(f"{record['id']}: scoring {run.name}")
        scores = evaluate_video(run / "video_by_bivdiff.mp4", source=run / "source_video.mp4", prompt=prompt,
                                clip_path=clip_path)
        rows.append({**record, **scores, "task": stats["task"], "config": stats["config"]})
    if not rows:
        raise UserError(f"None of the finished jobs in {folder} still has its video: nothing to score.")
    metrics = [m for m in METRICS if any(row.get(m) is not None for row in rows)]  # CLIP's need a CLIP model
    csv_path, md_path = folder / "eval.csv", folder / "eval.md"
    columns = ["id", "task", "config", *metrics, "run_folder"]
    sink = io.StringIO()
    csv.writer(sink, lineterminator="\n").writerows([columns] + [[row.get(c) for c in columns] for row in rows])
    write_text(csv_path, sink.getvalue())
    means = []
    for task in dict.fromkeys(row["task"] for row in rows):
        group = [row for row in rows if row["task"] == task]
        values = {m: [row[m] for row in group if row.get(m) is not None] for m in metrics}
        means.append({"task": task, "jobs": len(group), **{m: sum(v) / len(v) for m, v in values.items() if v}})
    text = "# Scores per job\n\n" + _markdown(rows, ["id", "task", *metrics])
    write_text(md_path, text + "\n# Means per task\n\n" + _markdown(means, ["task", "jobs", *metrics]))
    return csv_path, md_path


def _markdown(rows: list[dict], columns: list[str]) -> str:
    lines = [columns, ["---"] * len(columns)]
    for row in rows:
        values = [row.get(column) for column in columns]  # a mean of no values is missing: an empty cell
        lines.append(["" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v) for v in values])
    return "".join(f"| {' | '.join(line)} |\n" for line in lines)
