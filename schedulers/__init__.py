from .scheduling_bivdiff_ddim_inverse import BIVDiffDDIMInverseScheduler, BIVDiffDDIMInverseSchedulerOutput

__all__ = ["BIVDiffDDIMInverseScheduler", "BIVDiffDDIMInverseSchedulerOutput"]
