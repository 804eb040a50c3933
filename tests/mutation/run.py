"""Mutation testing of the numerical core with mutmut; see README.md beside this file.

mutmut names a mutant after its file's path (minus a leading `src/`) and activates it only in the module of that
name, but `pipelines/`, `schedulers/` and `models/` are installed as `bivdiff.*` from the repository root. So the
run happens in a staged copy with the installed layout, `.mutation/src/bivdiff/...`, where a file's path is its
import name; mutmut then copies that tree into `.mutation/mutants/`.

    python tests/mutation/run.py                  # every core mutant (the score in README.md)
    python tests/mutation/run.py "*schedulers*"   # only mutants whose name matches
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / ".mutation"
# Installed name -> folder in the repository (pyproject's [tool.setuptools.package-dir]).
PACKAGE_DIRS = {"bivdiff": "bivdiff", "pipelines": "pipelines", "schedulers": "schedulers", "models": "models"}
# The numerical core, as mutmut name globs: the inversion scheduler, stages 2 and 3, the pixel metrics, the outpaint
# and feather masks, and Prompt2Prompt's local blend. Input checks, messages and progress bars are left out.
MIXED = "bivdiff.pipelines.mixed_inversion."
CORE = [
    # The inversion step ships beside the pipelines (`bivdiff.schedulers` only re-exports it).
    MIXED + "xǁBIVDiffDDIMInverseSchedulerǁ*",
    MIXED + "x_ddim_sampler__*",
    *(f"bivdiff.evaluation.x_{name}__*" for name in ("frame_difference", "warp_error", "_float_frames", "_warp")),
    "bivdiff.evaluation.x__consistent__*",
    "bivdiff.pipelines.pipeline_bivdiff_inpaint.x_outpaint_mask__*",
    "bivdiff.pipelines.pipeline_bivdiff_inpaint.x_feather_mask__*",
    "bivdiff.pipelines.prompt2prompt_control.xǁLocalBlendǁ*",
    "bivdiff.pipelines.prompt2prompt_control.x__map_hw__*",
    *(MIXED + f"x_{name}__*" for name in ("fold_frames", "unfold_frames", "video_frame_generators")),
    *(MIXED + f"x_{name}__*" for name in ("derive_generators", "temporal_windows", "window_weights")),
    *(MIXED + f"x_{name}__*" for name in ("frame_pooled_norms", "video_windows_for_clip")),
    MIXED + "x_strength_steps__*",
    *(MIXED + f"x_{name}__*" for name in ("frame_batches", "self_attention_processor")),
    MIXED + "xǁFirstFrameAttnProcessorǁ*",
    *(
        MIXED + f"xǁMixedInversionMixinǁ{name}__*"
        for name in (
            "video_noise_prediction", "blend_windows", "temporal_windows_for", "encode_frames", "reencode_latents",
            "decode_latents", "image_inversion_noise", "invert_image_branch", "invert_video_branch", "mixed_inversion",
            "smoothing_scheduler", "temporal_smoothing", "invert_and_smooth", "inversion_timesteps",
            "video_image_prompt", "video_unet_noise", "run_frame_batches",
        )
    ),
]


def stage() -> None:
    """A fresh copy of the sources in the installed layout; mutmut's cache of earlier results is kept."""
    src = STAGE / "src" / "bivdiff"
    if src.parent.exists():
        shutil.rmtree(src.parent)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "bivdiff", src, ignore=ignore)
    for name, folder in PACKAGE_DIRS.items():
        if name != "bivdiff":
            shutil.copytree(ROOT / folder, src / name, ignore=ignore)
    shutil.copytree(ROOT / "configs", src / "configs", ignore=ignore)
    if (STAGE / "tests").exists():
        shutil.rmtree(STAGE / "tests")
    shutil.copytree(ROOT / "tests", STAGE / "tests", ignore=shutil.ignore_patterns("__pycache__", "mutation"))
    for name in ("pyproject.toml", "setup.cfg"):
        shutil.copy2(ROOT / name, STAGE / name)


def main(argv: list[str]) -> int:
    stage()
    patterns = argv or CORE
    mutmut = [sys.executable, "-m", "mutmut"]
    code = subprocess.call([*mutmut, "run", *patterns], cwd=STAGE)
    if code == 0:
        subprocess.call([*mutmut, "results"], cwd=STAGE)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
