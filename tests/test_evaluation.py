import json

import numpy as np
import pytest
import torch
from synthetic_videos import HEIGHT, NUM_FRAMES, STEP, WIDTH, flicker, texture, translating_video

from bivdiff import evaluation
from bivdiff.evaluation import clip_scores, evaluate_video, frame_difference, warp_error
from bivdiff.video_io import to_pil_frames, write_video


# ---------------------------------------------------------------------------------------------------------------
# frame_difference


def test_frame_difference_on_a_hand_built_video():
    levels = np.array([0, 51, 255, 255], np.uint8)  # steps of 0.2, 0.8 and 0
    video = np.broadcast_to(levels[:, None, None, None], (4, 8, 8, 3))
    assert frame_difference(video) == pytest.approx((0.2 + 0.8 + 0.0) / 3, abs=1e-7)


def test_frame_difference_counts_channels_and_pixels_evenly():
    video = np.zeros((2, 4, 4, 3), np.uint8)
    video[1, :2, :, 0] = 255  # half the pixels, one channel of three
    assert frame_difference(video) == pytest.approx(1 / 6, abs=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# warp_error


def test_warp_error_of_a_static_video_is_zero():
    static = np.stack([texture()[:HEIGHT, :WIDTH]] * NUM_FRAMES)
    assert warp_error(static) < 1e-3
    assert warp_error(static, source=static) < 1e-3


def test_warp_error_with_a_static_source_is_the_frame_difference():
    # Zero source flow warps nothing, and nothing is occluded: the warp error reduces to frame_difference.
    static = np.stack([texture()[:HEIGHT, :WIDTH]] * NUM_FRAMES)
    flickering = flicker(static)
    assert warp_error(flickering, source=static) == pytest.approx(frame_difference(flickering), abs=1e-3)


def test_warp_error_of_an_edit_that_follows_the_source_motion_is_small():
    source = translating_video()
    edited = np.sqrt(source)  # a colour edit that moves exactly as the source does
    consistent = warp_error(edited, source=source)
    assert consistent < 5e-3
    assert warp_error(source) < 5e-3  # own flow


def test_warp_error_grows_with_flicker():
    source = translating_video()
    edited = np.sqrt(source)
    consistent = warp_error(edited, source=source)
    flickering = warp_error(flicker(edited), source=source)
    assert flickering > 0.03
    assert flickering > 10 * consistent


def test_warp_error_ignores_pixels_that_leave_the_frame():
    # Content moves left: frame 0's left edge has no successor, so garbage there must not count.
    source = translating_video()
    leaving = source.copy()
    leaving[0, :, :STEP] = 1.0 - leaving[0, :, :STEP]
    assert warp_error(leaving, source=source) == pytest.approx(warp_error(source, source=source), abs=2e-4)


@pytest.mark.parametrize("backward_x, consistent", [(-3.0, True), (-2.5, True), (-2.0, False), (0.0, False)])
def test_occlusion_test_is_ruders_forward_backward_check(backward_x, consistent):
    # forward (3, 0): |f + b|^2 against 0.01 (|f|^2 + |b|^2) + 0.5, e.g. b = -2.5: 0.25 < 0.6525.
    forward = np.zeros((8, 16, 2), np.float32)
    forward[..., 0] = 3.0
    backward = np.zeros_like(forward)
    backward[..., 0] = backward_x
    mask = evaluation._consistent(forward, backward)
    assert mask[:, : 16 - 4].all() == consistent  # columns whose target lies inside the frame


def test_warp_error_accepts_pil_and_torch_frames_alike():
    source = translating_video()
    expected = warp_error(source)
    assert warp_error(to_pil_frames(source)) == pytest.approx(expected, abs=1e-6)
    assert warp_error(torch.from_numpy(source).permute(0, 3, 1, 2)) == pytest.approx(expected, abs=1e-6)


def test_warp_error_refuses_a_mismatched_source():
    video = translating_video()
    with pytest.raises(ValueError, match=r"6 frames of 96x64.*read_video"):
        warp_error(video[:4], source=video)


@pytest.mark.parametrize("metric", [warp_error, frame_difference])
def test_one_frame_has_no_temporal_metric(metric):
    with pytest.raises(ValueError, match="at least 2"):
        metric(translating_video()[:1])


# ---------------------------------------------------------------------------------------------------------------
# CLIP


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny CLIPModel saved like a real CLIP folder, with an offline tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPModel

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    from bivdiff.tiny_models import tiny_tokenizer

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            text, vocab_size=514, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513
        ),
        vision_config=dict(text, image_size=32, patch_size=8),
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).eval().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def random_frames(num_frames=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (num_frames, 40, 56, 3), dtype=np.uint8)


def reference_scores(folder, frames, prompt):
    """The same scores through CLIPModel's own forward (normalised embeddings), tokenizer and processor."""
    from transformers import AutoProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tokens = AutoTokenizer.from_pretrained(folder, local_files_only=True)([prompt], return_tensors="pt")
    pixels = AutoProcessor.from_pretrained(folder, local_files_only=True)(
        images=to_pil_frames(frames), return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    images, text = out.image_embeds, out.text_embeds[0]
    return {
        "clip_frame_consistency": 100 * float((images[:-1] * images[1:]).sum(-1).mean()),
        "clip_text_alignment": 100 * float((images @ text).mean()),
    }


def test_clip_scores_match_clip_model_forward(tiny_clip):
    frames = random_frames()
    scores = clip_scores(frames, "a rabbit in a meadow", clip_path=tiny_clip)
    expected = reference_scores(tiny_clip, frames, "a rabbit in a meadow")
    assert scores.keys() == expected.keys()
    for key in expected:
        assert -100 <= scores[key] <= 100
        assert scores[key] == pytest.approx(expected[key], abs=1e-3)


def test_identical_frames_are_fully_consistent(tiny_clip):
    still = np.repeat(random_frames(1), 5, axis=0)
    assert clip_scores(still, clip_path=tiny_clip) == {"clip_frame_consistency": pytest.approx(100, abs=1e-3)}


def test_clip_folder_without_image_processor_is_refused_by_name(tiny_clip, tmp_path):
    import shutil

    folder = tmp_path / "clip_without_processor"
    shutil.copytree(tiny_clip, folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="image processor from .*clip_without_processor"):
        clip_scores(random_frames(2), clip_path=folder)


def test_missing_clip_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_clip_here"):
        clip_scores(random_frames(2), clip_path=tmp_path / "no_clip_here")


# ---------------------------------------------------------------------------------------------------------------
# evaluate_video


def test_evaluate_video_from_paths_is_json_ready(tmp_path, tiny_clip):
    source = translating_video()
    video_path = write_video(np.sqrt(source), tmp_path / "edited.mp4", fps=8)
    source_path = write_video(source, tmp_path / "source", fps=8)
    results = evaluate_video(video_path, source=source_path, prompt="a texture", clip_path=tiny_clip)
    assert json.loads(json.dumps(results)) == results
    assert results["num_frames"] == NUM_FRAMES and (results["height"], results["width"]) == (HEIGHT, WIDTH)
    assert results["warp_flow"] == "source"
    assert 0 <= results["warp_error"] < 0.02 and 0 < results["frame_difference"] < 1
    assert {"clip_frame_consistency", "clip_text_alignment"} <= results.keys()


def test_evaluate_video_without_clip_has_only_pixel_metrics():
    video = translating_video()
    results = evaluate_video(video)
    assert results == {
        "num_frames": NUM_FRAMES,
        "height": HEIGHT,
        "width": WIDTH,
        "frame_difference": pytest.approx(frame_difference(video)),
        "warp_error": pytest.approx(warp_error(video)),
        "warp_flow": "output",
    }
