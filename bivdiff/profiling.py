"""What a run cost: denoising-network calls per stage, wall time per stage, and peak memory. Calls are counted with
forward pre-hooks and attributed to the stage the pipeline names in `pipe.current_stage` while it runs; times and
CUDA peaks come from the pipeline's `stage_log`."""

import sys
from collections import Counter, defaultdict
from functools import partial

COUNTED_MODULES = ("unet", "controlnet", "adapter", "inversion_unet", "video_unet")  # run once per (inversion) step


class NetworkCallCounter:
    """Context manager counting each network's forward calls per stage (a call may take many frames and CFG halves)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self._handles = []

    def __enter__(self) -> "NetworkCallCounter":
        modules = {}  # by id: a network registered under two names is counted once, under the first
        for name in COUNTED_MODULES:
            module = getattr(self.pipe, name, None)
            if hasattr(module, "register_forward_pre_hook"):
                modules.setdefault(id(module), (name, module))
        self._handles = [m.register_forward_pre_hook(partial(self._count, name)) for name, m in modules.values()]
        return self

    def _count(self, name: str, _module, _args) -> None:
        self.counts[getattr(self.pipe, "current_stage", None) or "outside stages"][name] += 1

    def __exit__(self, *exc) -> None:
        while self._handles:
            self._handles.pop().remove()

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {stage: dict(calls) for stage, calls in self.counts.items()}


def stage_summary(stage_log: list[dict], calls: dict[str, dict[str, int]]) -> list[dict]:
    """One entry per stage name, in first-run order: seconds (summed over repeats), network calls, CUDA peak."""
    runs = {name: [e for e in stage_log if e["stage"] == name] for name in [e["stage"] for e in stage_log] + [*calls]}
    return [{"stage": name, "seconds": sum(float(e["seconds"]) for e in entries) if entries else None,
             "runs": len(entries), "peak_memory_bytes": _peak(entries), "network_calls": dict(calls.get(name, {}))}
            for name, entries in runs.items()]


def _peak(stage_log: list[dict]) -> int | None:
    return max((e["peak_memory_bytes"] for e in stage_log if e.get("peak_memory_bytes") is not None), default=None)


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process so far (None where the platform does not say)."""
    try:
        import resource
    except ImportError:
        return None
    # Linux reports kilobytes, macOS bytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_memory(stage_log: list[dict], device_type: str) -> dict:
    """The run's peak memory: CUDA allocations on a GPU (from the stage log), else the process's peak RSS."""
    if device_type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": _peak(stage_log)}
    return {"kind": "process_peak_rss", "bytes": peak_rss_bytes()}
