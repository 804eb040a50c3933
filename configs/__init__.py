"""The task configs shipped with bivdiff: one YAML per task of the original BIVDiff release, under its name.

Each file starts with a one-line description (its first comment line), which `bivdiff list` shows.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def config_names() -> list[str]:
    """Names of the shipped configs, sorted (file stems, as `--config-name` takes them)."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def config_path(name: str) -> Path:
    """The YAML file of a shipped config; `name` may end in `.yaml`. Raises KeyError for an unknown name."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    path = CONFIG_DIR / f"{stem}.yaml"
    if stem not in config_names():
        raise KeyError(stem)
    return path


def config_description(name: str) -> str:
    """The first comment line of a shipped config, without the `# `."""
    for line in config_path(name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and line.strip("# "):
            return line.lstrip("#").strip()
    return ""
