"""The README cites tests as evidence (`test_file.py::test_name`, later names of one cell in the same file): each must
exist, or the citation points at nothing."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_the_readme_cites_exists():
    cited, missing, current = 0, [], None
    for cell in re.findall(r"`([^`]*::test_\w+)`", (ROOT / "README.md").read_text(encoding="utf-8")):
        file, _, name = cell.rpartition("::")
        current = file or current
        cited += 1
        if f"def {name}(" not in (ROOT / "tests" / current).read_text(encoding="utf-8"):
            missing.append(f"{current}::{name}")
    assert cited > 20 and not missing, missing
