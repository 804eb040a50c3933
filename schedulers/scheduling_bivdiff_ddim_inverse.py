"""Deterministic DDIM inversion exactly as the original BIVDiff `reverse_step`.

The class is defined beside the pipelines (`pipelines/mixed_inversion.py`): a pipeline loaded as a diffusers
community pipeline builds it from `scheduler.config` when no `inverse_scheduler` is given, so the step math ships
with every pipeline file and exists only there.
"""

from ..pipelines.mixed_inversion import BIVDiffDDIMInverseScheduler, BIVDiffDDIMInverseSchedulerOutput

__all__ = ["BIVDiffDDIMInverseScheduler", "BIVDiffDDIMInverseSchedulerOutput"]
