"""Jobs per minute of one `bivdiff batch` against the same jobs as separate `bivdiff run` commands, measured in one
run of this script (both as fresh processes, so both pay for starting Python and importing torch).

    python benchmarks/benchmark_batch.py                        # 8 --tiny jobs, CPU
    python benchmarks/benchmark_batch.py --jobs 4 --config controllable_video_generation_with_t2iadapter_and_vidrd

The batch builds the pipeline once for all jobs (they share a model set); each `bivdiff run` builds its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST = ["Model.width=32", "Model.height=32", "Model.video_length=3", "Model.num_inference_steps=2"]


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--config", default="controllable_video_generation_with_controlnet_and_zeroscope")
    args = parser.parse_args()
    bivdiff = [sys.executable, "-m", "bivdiff"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jobs = tmp / "jobs.jsonl"
        jobs.write_text("".join(json.dumps({"config": args.config, "overrides": [f"Model.seed={seed}"]}) + "\n"
                                for seed in range(args.jobs)))
        batch = timed([*bivdiff, "batch", str(jobs), "--output-dir", str(tmp / "batch"), "--tiny", *FAST])
        separate = sum(
            timed([*bivdiff, "run", "--tiny", args.config, f"Model.seed={seed}", "--output-dir", str(tmp / "runs"),
                   *FAST])
            for seed in range(args.jobs)
        )
        assert len(list((tmp / "batch").glob("job-*"))) == len(list((tmp / "runs").iterdir())) == args.jobs
    per_minute = {name: 60 * args.jobs / seconds for name, seconds in (("batch", batch), ("separate", separate))}
    print(f"{args.jobs} --tiny jobs of {args.config} ({' '.join(FAST)})")
    print(f"one bivdiff batch:        {batch:7.1f} s  {per_minute['batch']:6.2f} jobs/min")
    print(f"separate bivdiff run:     {separate:7.1f} s  {per_minute['separate']:6.2f} jobs/min")
    print(f"ratio (batch / separate): {per_minute['batch'] / per_minute['separate']:.2f}x jobs per minute")


if __name__ == "__main__":
    main()
