"""Model resolution for real (non-tiny) runs, offline: the one message listing every missing model, and loading
from the original checkpoints/ layout and from the Hugging Face cache (both filled with tiny models)."""

import shutil
from pathlib import Path

import pytest
from cli_helpers import FAST, only_run_folder, run_cli, save_tiny_checkpoints, stats

from bivdiff import configs as shipped
from bivdiff.config import load_config
from bivdiff.models_resolution import MissingModelsError, model_specs, resolve
from bivdiff.runner import run_config
from bivdiff.tasks import task_for

CONTROLNET_ZEROSCOPE = "controllable_video_generation_with_controlnet_and_zeroscope"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """An empty Hugging Face cache, and a snapshot_download that fails the test if it ever goes online."""
    import huggingface_hub
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    cached_only = huggingface_hub.snapshot_download

    def refuse(repo_id, local_files_only=False, **kwargs):
        assert local_files_only, f"the Hub was asked for {repo_id} in an offline test"
        return cached_only(repo_id, local_files_only=True, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def test_missing_models_are_all_listed_once_and_nothing_runs(tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "run",
        "--config-name",
        CONTROLNET_ZEROSCOPE,
        "--checkpoints",
        tmp_path / "checkpoints",
        "--offline",
        "--output-dir",
        tmp_path / "outputs",
    )
    assert code == 1
    assert err.count("error:") == 1 and "3 model(s) missing" in err and "nothing was run" in err
    for text in (
        "Stable Diffusion 1.5 [vae, text_encoder, tokenizer, unet, scheduler, model_index.json]",
        "ControlNet v1.1 canny",
        "ZeroScope v2 576w [unet, text_encoder, tokenizer]",
        f"not in {tmp_path / 'checkpoints' / 'stable-diffusion-v1-5'}",
        "stable-diffusion-v1-5/stable-diffusion-v1-5, runwayml/stable-diffusion-v1-5",
        "lllyasviel/control_v11p_sd15_canny",
        "cerspense/zeroscope_v2_576w",
        'hf download cerspense/zeroscope_v2_576w --include "unet/*"',
        f"--local-dir {tmp_path / 'checkpoints' / 'ZeroScope' / 'zeroscope_v2_576w'}",
        "without --offline",
        "--tiny",
    ):
        assert text in err, text
    assert not (tmp_path / "outputs").exists()


def test_only_the_models_still_missing_are_listed(tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    save_tiny_checkpoints(checkpoints)
    shutil.rmtree(checkpoints / "ControlNet")
    code, _, err = run_cli(capsys, "run", CONTROLNET_ZEROSCOPE, "--checkpoints", checkpoints, "--offline")
    assert code == 1 and "1 model(s) missing" in err and "ControlNet v1.1 canny" in err
    assert "Stable Diffusion 1.5" not in err and "ZeroScope" not in err


def test_vidrd_is_explained_as_a_conversion(tmp_path):
    name = "controllable_video_generation_with_t2iadapter_and_vidrd"
    config = load_config(shipped.config_path(name), ["IDM.T2IAdapter.condition=canny"])
    specs = model_specs(config, task_for(config), tmp_path / "checkpoints")
    with pytest.raises(MissingModelsError) as err:
        resolve(specs, offline=True)
    message = str(err.value)
    assert "VidRD (converted to diffusers)" in message and "T2I-Adapter canny" in message
    assert "download ModelT2V.pth" in message and "anonymous0x233/ReuseAndDiffuse" in message
    assert "conversion_scripts/convert_vidrd_to_diffusers.py --checkpoint" in message
    assert f"--output {tmp_path / 'checkpoints' / 'VidRD' / 'diffusers'}" in message
    assert "stabilityai/stable-diffusion-2-1-base" in message


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "controllable_video_generation_with_controlnet_and_animatediff",
            (
                "AnimateDiff motion adapter v1-5-3",
                "guoyww/animatediff-motion-adapter-v1-5-3, guoyww/animatediff-motion-adapter-v1-5-2",
                'hf download guoyww/animatediff-motion-adapter-v1-5-3 --include "*.json" --include "*.safetensors"',
                "--local-dir {root}/AnimateDiff/animatediff-motion-adapter-v1-5-3",
            ),
        ),
        (
            "controllable_video_generation_with_controlnet_and_modelscope",
            (
                "ModelScope text-to-video 1.7B [unet, text_encoder, tokenizer]",
                "ali-vilab/text-to-video-ms-1.7b, damo-vilab/text-to-video-ms-1.7b",
                'hf download ali-vilab/text-to-video-ms-1.7b --include "unet/*"',
                "--local-dir {root}/ModelScope/text-to-video-ms-1.7b",
            ),
        ),
    ],
)
def test_new_video_models_are_listed_with_their_hub_ids_and_download_hints(tmp_path, name, expected):
    config = load_config(shipped.config_path(name))
    with pytest.raises(MissingModelsError) as err:
        resolve(model_specs(config, task_for(config), tmp_path / "checkpoints"), offline=True)
    for text in expected:
        assert text.format(root=tmp_path / "checkpoints") in str(err.value), text


def test_animatediff_is_built_on_the_image_models_own_sd15_and_zeroscope_knows_its_length(tmp_path):
    from bivdiff.runner import build_pipeline, plan_run
    from bivdiff.tiny_models import tiny_motion_adapter

    checkpoints = save_tiny_checkpoints(tmp_path / "checkpoints")
    tiny_motion_adapter().save_pretrained(checkpoints / "AnimateDiff" / "animatediff-motion-adapter-v1-5-3")
    name = "controllable_video_generation_with_controlnet_and_animatediff"
    pipe = build_pipeline(plan_run(name, FAST, checkpoints=checkpoints, offline=True))
    assert type(pipe.video_unet).__name__ == "UNetMotionModel"
    # One SD-1.5 in memory: the motion UNet's spatial layers are the image UNet's, its text encoder the image one.
    assert pipe.video_unet.down_blocks[0].resnets is pipe.unet.down_blocks[0].resnets
    assert pipe.video_text_encoder is pipe.text_encoder and pipe.video_tokenizer is pipe.tokenizer

    # ZeroScope has ModelScope's class and config: its 24-frame training length is written into the loaded config.
    zeroscope = build_pipeline(plan_run(CONTROLNET_ZEROSCOPE, FAST, checkpoints=checkpoints, offline=True))
    assert zeroscope.video_unet.config.native_num_frames == 24


def test_annotator_weights_are_listed_when_an_annotator_is_used(tmp_path, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "controlnet_aux", types.ModuleType("controlnet_aux"))
    config = load_config(shipped.config_path(CONTROLNET_ZEROSCOPE), ["IDM.ControlNet.condition=openpose"])
    with pytest.raises(MissingModelsError) as err:
        resolve(model_specs(config, task_for(config), tmp_path), offline=True)
    assert "controlnet_aux annotator weights [body_pose_model.pth" in str(err.value)
    assert "lllyasviel/Annotators" in str(err.value)


def test_depth_without_controlnet_aux_names_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "controlnet_aux", None)
    code, _, err = run_cli(
        capsys,
        "run",
        CONTROLNET_ZEROSCOPE,
        "IDM.ControlNet.condition=depth_midas",
        "--checkpoints",
        tmp_path,
        "--offline",
    )
    assert code == 1 and 'pip install "bivdiff[annotators]"' in err


# ----------------------------------------------------------------------------------------------------------
# Loading real (here: tiny) weights through the non-tiny path


def fill_hf_cache(cache: Path, folder: Path, repo_id: str) -> None:
    """Lay a local model folder out as huggingface_hub's cache holds a downloaded snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)


def test_real_run_loads_the_checkpoints_layout(tmp_path, capsys):
    checkpoints = save_tiny_checkpoints(tmp_path / "checkpoints")
    code, out, err = run_cli(
        capsys,
        "run",
        CONTROLNET_ZEROSCOPE,
        "--checkpoints",
        checkpoints,
        "--offline",
        "--output-dir",
        tmp_path / "outputs",
        *FAST,
    )
    assert code == 0, err
    assert f"model:  Stable Diffusion 1.5: {checkpoints / 'stable-diffusion-v1-5'}" in out and "TINY" not in out
    data = stats(only_run_folder(tmp_path / "outputs"))
    assert data["tiny"] is False and data["note"] is None
    assert data["models"]["controlnet-canny"] == str(checkpoints / "ControlNet" / "control_v11p_sd15_canny")
    assert data["unet_calls"]["frame-wise generation"] == {"unet": 2, "controlnet": 2}


def test_real_run_reads_the_hugging_face_cache(tmp_path):
    checkpoints = save_tiny_checkpoints(tmp_path / "tree")
    cache = tmp_path / "hf_cache"
    # The second known id of a model is used when the first is not cached.
    fill_hf_cache(cache, checkpoints / "stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")
    fill_hf_cache(cache, checkpoints / "ControlNet" / "control_v11p_sd15_canny", "lllyasviel/control_v11p_sd15_canny")
    fill_hf_cache(cache, checkpoints / "ZeroScope" / "zeroscope_v2_576w", "cerspense/zeroscope_v2_576w")
    folder = run_config(
        CONTROLNET_ZEROSCOPE,
        [*FAST, "Model.video_length=2"],
        checkpoints=tmp_path / "empty_checkpoints",
        output_dir=tmp_path / "outputs",
        offline=True,
        cache_dir=str(cache),
    )
    data = stats(folder)
    assert data["models"] == {
        "sd15": "runwayml/stable-diffusion-v1-5",
        "zeroscope": "cerspense/zeroscope_v2_576w",
        "controlnet-canny": "lllyasviel/control_v11p_sd15_canny",
    }
    assert data["video"]["frames"] == 2


# ----------------------------------------------------------------------------------------------------------
# Online resolution, with huggingface_hub's snapshot_download replaced (no network)


def sd15_spec(tmp_path):
    from bivdiff.models_resolution import spec
    from bivdiff.models_resolution import SD15_PARTS

    return spec("sd15", SD15_PARTS, tmp_path / "none")


def fake_hub(monkeypatch, answer):
    """Nothing is cached; online calls go to `answer(repo_id)`. Returns the online calls."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    asked = []

    def snapshot_download(repo_id, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        asked.append((repo_id, kwargs["allow_patterns"], kwargs["dry_run"]))
        return answer(repo_id)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return asked


def not_found(repo_id):
    """Just what huggingface_hub's HTTP errors read from a response."""
    from types import SimpleNamespace

    return SimpleNamespace(status_code=404, headers={}, request=None, url=repo_id)


def test_online_each_hub_id_is_tried_in_order_and_only_the_needed_files_are_fetched(tmp_path, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    def answer(repo_id):
        if repo_id.startswith("stable-diffusion-v1-5/"):
            raise RepositoryNotFoundError("404 gone", response=not_found(repo_id))
        return str(tmp_path / "snapshot")

    asked = fake_hub(monkeypatch, answer)
    resolved = resolve([sd15_spec(tmp_path)], offline=False)["sd15"]
    assert resolved.location == "runwayml/stable-diffusion-v1-5" and not resolved.is_local
    tried = ["stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"]
    assert [repo for repo, _, _ in asked] == tried
    assert asked[0][1] == ["vae/*", "text_encoder/*", "tokenizer/*", "unet/*", "scheduler/*", "model_index.json"]
    assert asked[0][2] is False  # a real run downloads; a dry run only checks
    resolve([sd15_spec(tmp_path)], offline=False, download=False)
    assert asked[-1][2] is True


def test_an_unreachable_hub_is_asked_once_and_reported(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def answer(repo_id):
        raise LocalEntryNotFoundError("cannot reach the Hub")

    asked = fake_hub(monkeypatch, answer)
    with pytest.raises(MissingModelsError) as err:
        resolve([sd15_spec(tmp_path), *zeroscope_specs(tmp_path)], offline=False)
    assert len(asked) == 1
    assert "the Hub could not be reached: cannot reach the Hub" in str(err.value)
    assert "2 model(s) missing" in str(err.value)


def zeroscope_specs(tmp_path):
    from bivdiff.models_resolution import spec
    from bivdiff.models_resolution import parts_of

    return [spec("zeroscope", parts_of("zeroscope"), tmp_path / "none")]
