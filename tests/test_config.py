"""Run configs: the shipped YAMLs match the original release, overrides merge as in Hydra, bad keys and values
fail before anything loads with messages naming the key and the fix."""

import pytest
import yaml

from bivdiff import configs as shipped
from bivdiff.config import QUALITY_NEGATIVE, QUALITY_SUFFIX, load_config, parse_overrides
from bivdiff.errors import ConfigError

CONTROLNET_ZEROSCOPE = "controllable_video_generation_with_controlnet_and_zeroscope"

# Per config: (idm, vdm, mixing ratio, idm_prompt, vdm_prompt), as in the original configs.
ORIGINAL = {
    "controllable_video_generation_with_controlnet_and_vidrd": (
        "ControlNet",
        "VidRD",
        1.0,
        "A person on a motorcycle does a burnout on a frozen lake",
        "A person on a motorcycle does a burnout on a frozen lake",
    ),
    CONTROLNET_ZEROSCOPE: (
        "ControlNet",
        "ZeroScope",
        1.0,
        "A bear walking through a snow mountain",
        "A bear walking through a snow mountain",
    ),
    "controllable_video_generation_with_t2iadapter_and_vidrd": (
        "T2IAdapter",
        "VidRD",
        1.0,
        "A red car moves in front of buildings",
        "A red car moves in front of buildings",
    ),
    "video_editing_with_instruct_pix2pix_and_vidrd": (
        "InstructPix2Pix",
        "VidRD",
        1.0,
        "Make him on the road",
        "A man moonwalks on the road",
    ),
    "video_editing_with_instruct_pix2pix_and_zeroscope": (
        "InstructPix2Pix",
        "ZeroScope",
        1.0,
        "Make it minecraft style",
        "A train is running, minecraft style",
    ),
    "video_editing_with_prompt2prompt_and_vidrd": (
        "Prompt2Prompt",
        "VidRD",
        0.25,
        "A car is moving on the road",
        "A car is moving on the road in the forest",
    ),
    "video_inpainting_with_stable_diffusion_inpainting_and_vidrd": ("StableDiffusionInpainting", "VidRD", 0.1, "", ""),
    "video_outpainting_with_stable_diffusion_inpainting_and_vidrd": (
        "StableDiffusionOutpainting",
        "VidRD",
        0.1,
        "",
        "",
    ),
}


def load(name=CONTROLNET_ZEROSCOPE, overrides=(), tiny=False):
    return load_config(shipped.config_path(name), list(overrides), tiny=tiny, name=name)


def test_every_original_config_is_shipped_under_its_name():
    # Beside them, the same tasks with the newer video models.
    newer = ("_animatediff", "_modelscope")
    assert [n for n in shipped.config_names() if not n.endswith(newer)] == sorted(ORIGINAL)
    for name in ORIGINAL:
        assert shipped.config_description(name)


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_shipped_config_keeps_the_original_values(name):
    idm, vdm, ratio, idm_prompt, vdm_prompt = ORIGINAL[name]
    raw = yaml.safe_load(shipped.config_path(name).read_text())
    assert list(raw) == ["VDM", "IDM", "MixedInversion", "Model"]
    config = load(name)
    model = config.model
    assert (config.idm, config.vdm, model["idm_prompt"], model["vdm_prompt"]) == (idm, vdm, idm_prompt, vdm_prompt)
    assert config.idm_options["mixing_ratio"] == ratio
    assert (model["width"], model["height"], model["video_length"], model["frame_rate"]) == (512, 512, 8, 4)
    assert (model["seed"], model["guidance_scale"], model["num_inference_steps"]) == (42, 7.5, 50)
    assert model["video_path"] is None  # the shipped clip
    assert config.mixed_inversion == {
        "idm": "SD-v15",
        "pretrained_model_path": "./checkpoints/stable-diffusion-v1-5",
        # not in the original's files: its behaviour, restored by default
        "pool_norms_over_frames": True,
        "reencode_frames": True,
        "strength": 1.0,
    }
    quality = idm in ("ControlNet", "InstructPix2Pix")
    assert raw["IDM"][idm]["prompt_suffix"] == (QUALITY_SUFFIX if quality else "")
    assert raw["IDM"][idm]["negative_prompt"] == (QUALITY_NEGATIVE if quality else "")


def test_idm_specific_original_values():
    assert load("controllable_video_generation_with_controlnet_and_vidrd").idm_options["condition"] == "depth_midas"
    assert load(CONTROLNET_ZEROSCOPE).idm_options["condition"] == "canny"
    p2p = load("video_editing_with_prompt2prompt_and_vidrd").idm_options
    assert p2p["controller_type"] == "AttentionRefine" and p2p["local_blend_words"] == []
    assert p2p["prompts"] == ["A car is moving on the road", "A car is moving on the road in the forest"]
    outpainting = load("video_outpainting_with_stable_diffusion_inpainting_and_vidrd")
    assert outpainting.idm_options["mask_type"] == "horizontal"
    vidrd = load("video_editing_with_prompt2prompt_and_vidrd").vdm_options
    assert vidrd["ckpt_path"] == "./checkpoints/VidRD/ModelT2V.pth" and vidrd["resolution"] == 256


def test_quality_prompts_are_the_originals_verbatim():
    assert QUALITY_SUFFIX.startswith(" ,best quality, extremely detailed")
    assert QUALITY_NEGATIVE.startswith("longbody, lowres") and "fewer difits" in QUALITY_NEGATIVE


def test_dotted_overrides_win_and_keep_text_verbatim():
    config = load(
        overrides=[
            "Model.num_inference_steps=20",
            "IDM.ControlNet.condition=depth_midas",
            "Model.idm_prompt=A fox: running, fast",
            "IDM.ControlNet.mixing_ratio=0.5",
            "Model.vdm_prompt=",
        ]
    )
    assert config.model["num_inference_steps"] == 20
    assert config.idm_options["condition"] == "depth_midas"
    assert config.model["idm_prompt"] == "A fox: running, fast"
    assert config.idm_options["mixing_ratio"] == 0.5
    assert config.model["vdm_prompt"] == ""


def test_list_overrides_parse_as_yaml():
    config = load(
        "video_editing_with_prompt2prompt_and_vidrd",
        ["IDM.Prompt2Prompt.prompts=[a red car, a blue car]", "IDM.Prompt2Prompt.local_blend_words=[car, car]"],
    )
    assert config.idm_options["prompts"] == ["a red car", "a blue car"]
    assert config.idm_options["local_blend_words"] == ["car", "car"]


def test_frame_stride_is_the_frame_rate_key():
    assert load(overrides=["Model.frame_stride=2"]).model["frame_rate"] == 2
    assert load(overrides=["Model.frame_rate=3"]).model["frame_stride"] == 3
    with pytest.raises(ConfigError, match="disagree"):
        load(overrides=["Model.frame_stride=2", "Model.frame_rate=3"])


def test_tiny_defaults_are_small_and_overridable():
    tiny = load(tiny=True)
    assert (tiny.model["width"], tiny.model["video_length"], tiny.model["num_inference_steps"]) == (64, 4, 4)
    assert load(tiny=True, overrides=["Model.video_length=2"]).model["video_length"] == 2


@pytest.mark.parametrize(
    "override, named, suggested",
    [
        ("Model.num_inference_step=20", "Model.num_inference_step", "Model.num_inference_steps"),
        ("Model.mixing_ratio=0.5", "Model.mixing_ratio", "IDM.ControlNet.mixing_ratio"),
        ("IDM.ControlNet.conditon=canny", "IDM.ControlNet.conditon", "IDM.ControlNet.condition"),
        ("IDM.ControlNett.condition=canny", "IDM.ControlNett", "IDM.ControlNet"),
        ("Modle.seed=1", "Modle", "Model"),
    ],
)
def test_unknown_override_names_the_key_and_the_nearest(override, named, suggested):
    with pytest.raises(ConfigError) as err:
        load(overrides=[override])
    message = str(err.value)
    assert repr(named) in message and suggested in message and "command-line overrides" in message


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    text = shipped.config_path(CONTROLNET_ZEROSCOPE).read_text().replace("  seed: 42", "  sed: 42")
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"'Model.sed'.*mine.yaml.*Model.seed"):
        load_config(path)


def test_an_original_config_file_loads_hydra_section_and_all(tmp_path):
    original = {
        "hydra": {"output_subdir": None, "run": {"dir": "."}},
        "VDM": {"ZeroScope": {"ckpt_path": "./checkpoints/ZeroScope/zeroscope_v2_576w"}},
        "IDM": {"ControlNet": {"condition": "canny", "mixing_ratio": 1.0}},
        "MixedInversion": {"idm": "SD-v15", "pretrained_model_path": "./checkpoints/stable-diffusion-v1-5"},
        "Model": {
            "idm": "ControlNet",
            "vdm": "ZeroScope",
            "idm_prompt": "A bear",
            "vdm_prompt": "A bear",
            "video_path": "./data/bear.mp4",
            "output_path": "./outputs/",
            "video_length": 8,
            "width": 512,
            "height": 512,
            "frame_rate": 4,
            "seed": 42,
            "guidance_scale": 7.5,
            "num_inference_steps": 50,
        },
    }
    path = tmp_path / "original.yaml"
    path.write_text(yaml.safe_dump(original))
    with pytest.raises(ConfigError, match=r"Model.video_path: no file or folder at ./data/bear.mp4"):
        load_config(path)
    config = load_config(path, ["Model.video_path=null"])
    assert "hydra" not in config.data
    # Keys the original files lack take the original's per-IDM defaults.
    assert config.idm_options["negative_prompt"] == QUALITY_NEGATIVE


@pytest.mark.parametrize(
    "override, message",
    [
        ("Model.width=500", "not a multiple of 8.*496 or 504"),
        ("IDM.ControlNet.mixing_ratio=1.5", "mixing_ratio=1.5 must be a number in"),
        ("Model.video_length=0", "video_length=0 must be a whole number >= 1"),
        ("Model.video_path=missing.mp4", "Model.video_path: no file or folder at missing.mp4"),
        ("IDM.ControlNet.condition=depth", "condition='depth' must be one of: depth_midas, canny, openpose"),
        ("Model.idm_prompt=", "idm_prompt is empty"),
        ("Model.device=gpu", "Model.device='gpu'"),
        ("MixedInversion.strength=1.5", r"strength=1.5 must be a number in \[0.0, 1.0\]"),
        ("MixedInversion.strength=0", "strength=0.0 keeps no step of Model.num_inference_steps=50: use at least 0.02"),
        ("MixedInversion.strength=0.01", "strength=0.01 keeps no step"),
        # OmegaConf's reason ends with a full stop of its own: the message ends with one, not two.
        ("Model.video_freeu=0.9", r"Bad value for Model.video_freeu in the command-line overrides: .*[^.]\.\Z"),
    ],
)
def test_bad_values_fail_with_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load(overrides=[override])


def test_reweight_needs_one_strength_per_word():
    name = "video_editing_with_prompt2prompt_and_vidrd"
    with pytest.raises(ConfigError, match="one strength per word"):
        load(name, ["IDM.Prompt2Prompt.reweight_words=[car, road]", "IDM.Prompt2Prompt.reweight_strengths=[2]"])


def test_all_bad_values_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load(overrides=["Model.width=500", "Model.num_inference_steps=0"])
    assert "2 problem(s)" in str(err.value)


def test_unknown_image_model_lists_the_known_ones():
    with pytest.raises(ConfigError, match="Model.idm='ControlNetXL'.*T2IAdapter"):
        load(overrides=["Model.idm=ControlNetXL"])


def test_override_without_equals_sign_explains_the_form():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["Model.seed"])


def test_resolved_config_round_trips(tmp_path):
    config = load(tiny=True, overrides=["Model.frame_stride=2"])
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    again = load_config(path, tiny=True)
    assert again.data == config.data


def test_cross_frame_attention_needs_two_frames_per_batch_and_is_not_for_prompt2prompt():
    name = "controllable_video_generation_with_controlnet_and_zeroscope"
    on = "Model.cross_frame_attention=true"
    with pytest.raises(ConfigError, match="cross_frame_attention=true needs Model.frame_batch_size >= 2"):
        load_config(shipped.config_path(name), [on, "Model.frame_batch_size=1"], name=name)
    for fine in ([on, "Model.frame_batch_size=2"], [on, "Model.frame_batch_size=1", "Model.video_length=1"],
                 ["Model.frame_batch_size=1"]):
        load_config(shipped.config_path(name), fine, name=name)
    p2p = "video_editing_with_prompt2prompt_and_vidrd"
    with pytest.raises(ConfigError, match="Prompt2Prompt's attention editing owns stage 1's self-attention"):
        load_config(shipped.config_path(p2p), [on], name=p2p)


def test_video_window_overlap_must_leave_a_stride():
    name = "controllable_video_generation_with_controlnet_and_zeroscope"
    with pytest.raises(ConfigError, match="video_window_overlap=4 must be a whole number from 0 to"):
        load_config(shipped.config_path(name), ["Model.video_window=4"], name=name)
    config = load_config(shipped.config_path(name), ["Model.video_window=8"], name=name)
    assert (config.model["video_window"], config.model["video_window_overlap"]) == (8, 4)
