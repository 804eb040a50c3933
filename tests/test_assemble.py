"""conversion_scripts/assemble_pipeline.py: a model folder assembled from tiny components loads both ways
(as a custom pipeline from its own file, and through the class) and gives the same video."""

import json

import numpy as np
import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from script_helpers import load_script

from bivdiff import BIVDiffControllablePipeline
from bivdiff.runner import build_pipeline, plan_run

CONFIG = "controllable_video_generation_with_t2iadapter_and_vidrd"
OVERRIDES = ["IDM.T2IAdapter.condition=canny", "Model.width=32", "Model.height=32", "Model.video_length=2"]


@pytest.fixture(scope="module")
def assemble():
    return load_script("assemble_pipeline")


def tiny_config():
    return plan_run(CONFIG, OVERRIDES, tiny=True).config


def tiny_pipeline():
    return build_pipeline(plan_run(CONFIG, OVERRIDES, tiny=True))


def call(pipe):
    pipe.set_progress_bar_config(disable=True)
    edges = np.zeros((2, 32, 32), dtype=np.uint8)
    edges[:, 8:24, 16] = 255
    return pipe(
        prompt="a red car",
        conditioning_frames=[e for e in edges],
        num_inference_steps=2,
        mixing_ratio=0.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames


def test_assembled_folder_loads_both_ways_with_equal_outputs(assemble, tmp_path, modules_cache):
    config = tiny_config()
    pipe = tiny_pipeline()
    expected = call(pipe)
    folder = assemble.write_model_folder(pipe, tmp_path / "model", config)

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "BIVDiffControllablePipeline"
    assert index["inverse_scheduler"] == ["mixed_inversion", "BIVDiffDDIMInverseScheduler"]
    assert (folder / "inverse_scheduler" / "mixed_inversion.py").is_file()
    assert (folder / "pipeline_bivdiff_controllable.py").is_file() and (folder / "mixed_inversion.py").is_file()
    assert index["adapter"] == ["diffusers", "T2IAdapter"] and index["controlnet"] == [None, None]

    as_custom = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline=str(folder / "pipeline_bivdiff_controllable.py"), trust_remote_code=True
    )
    assert type(as_custom).__module__.startswith("diffusers_modules")
    as_class = BIVDiffControllablePipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(as_class) is BIVDiffControllablePipeline
    np.testing.assert_allclose(call(as_custom), expected, atol=1e-5)
    np.testing.assert_allclose(call(as_class), expected, atol=1e-5)


def test_model_card_names_task_models_licences_and_usage(assemble, tmp_path):
    config = tiny_config()
    pipe = tiny_pipeline()
    folder = assemble.write_model_folder(pipe, tmp_path / "model", config)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: other\nlibrary_name: diffusers\n")
    assert "$" not in card.split("```python")[0]  # every placeholder filled
    assert "controllable video generation (T2I-Adapter) with VidRD" in card
    assert "Tiny random weights" in card and "noise" in card
    assert 'custom_pipeline="pipeline_bivdiff_controllable", trust_remote_code=True' in card
    assert "conditioning_frames=conditions" in card and "adapter_conditioning_scale=1.0" in card
    assert 'convert("L")' in card  # the canny adapter takes one channel
    assert yaml.safe_load((folder / "bivdiff_config.yaml").read_text()) == config.data


def test_usage_snippet_runs_as_python(assemble, tmp_path, modules_cache, monkeypatch):
    from diffusers.utils import export_to_video

    config = tiny_config()
    pipe = tiny_pipeline()
    folder = assemble.write_model_folder(pipe, tmp_path / "model", config)
    snippet = assemble.usage_snippet(pipe, config, "pipeline_bivdiff_controllable")
    # The snippet as a user on a CPU would run it: this folder for the Hub id, float32 on the CPU.
    snippet = snippet.replace("PATH_OR_REPO_ID", str(folder)).replace('.to("cuda")', "")
    snippet = snippet.replace("torch_dtype=torch.float16", "torch_dtype=torch.float32")
    monkeypatch.chdir(tmp_path)
    export_to_video(list(np.random.default_rng(0).random((8, 48, 40, 3))), "input.mp4", fps=8)
    namespace = {}
    exec(compile(snippet, "usage", "exec"), namespace)
    assert np.asarray(namespace["video"]).shape == (2, 32, 32, 3)
    assert (tmp_path / "bivdiff.mp4").stat().st_size > 0


def test_model_table_lists_resolved_models_with_licences(assemble, tmp_path):
    from bivdiff.models_resolution import ResolvedModel, spec
    from bivdiff.models_resolution import SD15_PARTS

    models = {
        "sd15": ResolvedModel(
            spec("sd15", SD15_PARTS, tmp_path), "stable-diffusion-v1-5/stable-diffusion-v1-5", False
        ),
        "t2iadapter-canny": ResolvedModel(spec("t2iadapter-canny", (), tmp_path / "t2i"), str(tmp_path / "t2i"), True),
    }
    table = assemble.models_table(tiny_config(), models)
    assert "[stable-diffusion-v1-5/stable-diffusion-v1-5](https://huggingface.co/stable-diffusion-v1-5/" in table
    assert "CreativeML OpenRAIL-M" in table and "Apache-2.0" in table
    assert "TencentARC/t2iadapter_canny_sd15v2" in table  # a local copy is credited to its Hub origin


def test_script_refuses_to_overwrite(assemble, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    code = assemble.main(["--config-name", CONFIG, "--tiny", "--output", str(tmp_path / "model"), *OVERRIDES])
    assert code == 1 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "model" / "keep.txt").read_text() == "mine"


def test_animatediff_config_assembles_into_a_folder_with_a_motion_unet(assemble, tmp_path, modules_cache):
    name = "controllable_video_generation_with_controlnet_and_animatediff"
    overrides = ["Model.width=32", "Model.height=32", "Model.video_length=2"]
    output = ["--output", str(tmp_path / "model")]
    code = assemble.main(["--config-name", name, "--tiny", "--dtype", "fp32", *output, *overrides])
    assert code == 0
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["video_unet"] == ["diffusers", "UNetMotionModel"]
    loaded = BIVDiffControllablePipeline.from_pretrained(tmp_path / "model", trust_remote_code=True)
    edges = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    args = dict(prompt="a red car", num_inference_steps=2, mixing_ratio=0.5, output_type="np")

    def run(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(conditioning_frames=edges, generator=torch.Generator().manual_seed(0), **args).frames

    np.testing.assert_allclose(run(loaded), run(build_pipeline(plan_run(name, overrides, tiny=True))), atol=1e-5)
