import os

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
    """Point diffusers' dynamic-module cache at a temp folder so custom_pipeline loads see no stale copies."""
    import diffusers.utils.constants as constants
    import diffusers.utils.dynamic_modules_utils as dyn

    cache = tmp_path / "hf_modules"
    monkeypatch.setenv("HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(cache))
    return cache
