"""What a run cost: denoising-network calls per stage, wall time per stage, and peak memory.

Calls are counted with forward pre-hooks and attributed to the stage the pipeline names in `pipe.current_stage`
while it runs; times and CUDA peaks come from the pipeline's `stage_log`.
"""

from __future__ import annotations

import sys
from collections import defaultdict

# The networks that run once per denoising or inversion step.
COUNTED_MODULES = ("unet", "controlnet", "adapter", "inversion_unet", "video_unet")
OUTSIDE_STAGES = "outside stages"


class NetworkCallCounter:
    """Context manager counting forward calls of each counted network of `pipe`, per stage.

    One call may process a whole batch of frames (and both halves of classifier-free guidance).
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._handles = []

    def __enter__(self) -> NetworkCallCounter:
        modules = {}  # by id: a network registered under two names is counted once, under the first
        for name in COUNTED_MODULES:
            module = getattr(self.pipe, name, None)
            if hasattr(module, "register_forward_pre_hook"):
                modules.setdefault(id(module), (name, module))
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in modules.values()]
        return self

    def _hook(self, name: str):
        def count(_module, _args):
            self.counts[getattr(self.pipe, "current_stage", None) or OUTSIDE_STAGES][name] += 1

        return count

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {stage: dict(calls) for stage, calls in self.counts.items()}


def stage_summary(stage_log: list[dict], calls: dict[str, dict[str, int]]) -> list[dict]:
    """One entry per stage name, in first-run order: seconds (summed over repeats), network calls, CUDA peak."""
    stages: dict[str, dict] = {}
    for entry in stage_log:
        name = entry["stage"]
        stage = stages.setdefault(name, {"stage": name, "seconds": 0.0, "runs": 0, "peak_memory_bytes": None})
        stage["seconds"] += float(entry["seconds"])
        stage["runs"] += 1
        peak = entry.get("peak_memory_bytes")
        if peak is not None:
            stage["peak_memory_bytes"] = max(peak, stage["peak_memory_bytes"] or 0)
    for name in calls:
        stages.setdefault(name, {"stage": name, "seconds": None, "runs": 0, "peak_memory_bytes": None})
    return [{**stage, "network_calls": dict(calls.get(name, {}))} for name, stage in stages.items()]


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process so far (None where the platform does not say)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def peak_memory(stage_log: list[dict], device_type: str) -> dict:
    """The run's peak memory: CUDA allocations on a GPU (from the stage log), else the process's peak RSS."""
    if device_type == "cuda":
        peaks = [e["peak_memory_bytes"] for e in stage_log if e.get("peak_memory_bytes") is not None]
        return {"kind": "cuda_max_allocated", "bytes": max(peaks) if peaks else None}
    return {"kind": "process_peak_rss", "bytes": peak_rss_bytes()}
