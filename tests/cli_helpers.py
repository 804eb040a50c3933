"""Shared helpers for the command-line tests: calling `bivdiff.cli.main` and reading a run folder."""

from __future__ import annotations

import json
from pathlib import Path

from bivdiff.cli import main

# Small enough to keep a tiny run to seconds on two CPU cores.
FAST = ["Model.width=32", "Model.height=32", "Model.video_length=3", "Model.num_inference_steps=2"]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def only_run_folder(output_root: Path) -> Path:
    folders = [p for p in Path(output_root).iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def stats(folder: Path) -> dict:
    return json.loads((folder / "stats.json").read_text())
