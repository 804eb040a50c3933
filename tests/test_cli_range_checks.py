"""Every check of a config value refuses the run before any model is built or looked up: one case per declared
range or choice of the schema, plus the checks written by hand."""

from dataclasses import fields

import pytest
from cli_helpers import run_cli

import bivdiff.runner as runner
from bivdiff import configs as shipped
from bivdiff.config import SECTIONS, valid_keys

def range_checks() -> list[tuple[str, object]]:
    """(dotted key, a value just outside its range) for every range or choice the schema declares."""
    cases = []
    for key in valid_keys():
        section, name = key.rsplit(".", 1)
        parts = section.split(".")
        schema = SECTIONS[parts[0]][parts[1]] if len(parts) == 2 else SECTIONS[parts[0]]
        meta = {f.name: f.metadata for f in fields(schema)}[name]
        if "choices" in meta:
            cases.append((key, "not_" + meta["choices"][0]))
        elif "low" in meta:
            cases += [(key, meta["low"] - 1)] + ([(key, meta["high"] + 1)] if meta["high"] is not None else [])
    return cases


# A shipped config for each image model, so each IDM section's checks run where that section is used.
CONFIG_OF = {
    "ControlNet": "controllable_video_generation_with_controlnet_and_zeroscope",
    "T2IAdapter": "controllable_video_generation_with_t2iadapter_and_vidrd",
    "InstructPix2Pix": "video_editing_with_instruct_pix2pix_and_zeroscope",
    "Prompt2Prompt": "video_editing_with_prompt2prompt_and_vidrd",
    "StableDiffusionInpainting": "video_inpainting_with_stable_diffusion_inpainting_and_vidrd",
    "StableDiffusionOutpainting": "video_outpainting_with_stable_diffusion_inpainting_and_vidrd",
}
HAND_WRITTEN = [
    ("Model.width", 500, "not a multiple of 8"),
    ("Model.device", "gpu", "must be auto, cpu, cuda"),
    ("Model.video_window", 4, "video_window_overlap=4 must be a whole number from 0 to"),
    ("IDM.ControlNet.control_guidance_start", 1.0, "must be below IDM.ControlNet.control_guidance_end=1.0"),
    ("IDM.ControlNet.control_smoothing", "true", "control_smoothing=true needs Model.vdm=AnimateDiff"),
    ("Model.video_freeu", "[0.9,0.2,1.2]", "must be FreeU's four factors"),
    ("Model.video_freeu", "[0.9,0.2,1.2,-1]", "must be FreeU's four factors"),
    ("Model.idm_prompt", "' '", "Model.idm_prompt is empty"),
    ("Model.seed", "abc", "Bad value for Model.seed"),
    ("Model.idm", "ControlNetXL", "not an image model"),
    ("Model.video_path", "missing.mp4", "no file or folder at missing.mp4"),
    ("IDM.ControlNet.condition_video", "missing.mp4", "no file or folder at missing.mp4"),
    ("IDM.StableDiffusionInpainting.video_mask_path", "missing.mp4", "no file or folder at missing.mp4"),
    ("IDM.Prompt2Prompt.prompts", "[just one]", "must be two non-empty prompts"),
]
CASES = [(key, value, f"{key}=") for key, value in range_checks()] + HAND_WRITTEN


def test_every_shipped_image_model_is_covered():
    assert set(CONFIG_OF.values()) <= set(shipped.config_names())
    assert {key.split(".")[1] for key, _ in range_checks() if key.startswith("IDM.")} == set(CONFIG_OF)


@pytest.fixture(autouse=True)
def no_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built or looked up before the config was refused")

    monkeypatch.setattr(runner, "build_pipeline", refuse)
    monkeypatch.setattr(runner, "resolve", refuse)


@pytest.mark.parametrize("key, value, message", CASES, ids=[f"{key}={value}" for key, value, _ in CASES])
def test_each_check_refuses_before_any_model(key, value, message, tmp_path, capsys):
    idm = key.split(".")[1] if key.startswith("IDM.") else "ControlNet"
    args = ["run", CONFIG_OF[idm], f"{key}={value}", "--output-dir", tmp_path, "--offline", "--checkpoints", tmp_path]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and message in err and ("must be" in err or message != f"{key}="), err
    assert not any(tmp_path.iterdir())
