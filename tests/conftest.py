import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Tiny models gain nothing from intra-op threads, and under pytest-xdist each worker would otherwise start one
# thread per core: on a 2-core runner the threads then mostly wait for each other (tests ran up to 10x slower).
torch.set_num_threads(1)


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Point diffusers' dynamic-module cache at a temp folder so custom_pipeline loads see no stale copies.

    The `diffusers_modules` packages an earlier load imported in this process are forgotten too: a loaded file's
    relative imports would otherwise resolve through them, in that load's cache folder.
    """
    import diffusers.utils.constants as constants
    import diffusers.utils.dynamic_modules_utils as dyn

    cache = tmp_path / "hf_modules"
    cache.mkdir()
    monkeypatch.setenv("HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(cache))
    for name in [m for m in sys.modules if m.split(".")[0] == "diffusers_modules"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(cache))
    return cache
