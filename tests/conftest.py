import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


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
