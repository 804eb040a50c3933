"""`bivdiff eval`: the command-line wiring of evaluate_video and its JSON (the metrics are tested in
test_evaluation.py)."""

import json

import pytest
from cli_helpers import run_cli
from synthetic_videos import HEIGHT, NUM_FRAMES, WIDTH, flicker, static_video, translating_video

from bivdiff.video_io import write_video


def save(frames, path):
    """PNG folders are lossless, so the scores see exactly these frames."""
    return write_video(frames, path, fps=8)


def evaluate(capsys, *args):
    code, out, err = run_cli(capsys, "eval", *args)
    assert code == 0, err
    return json.loads(out)


def test_static_video_has_no_warp_error(tmp_path, capsys):
    scores = evaluate(capsys, save(static_video(), tmp_path / "static"))
    assert scores["warp_error"] < 1e-3 and scores["frame_difference"] < 1e-6
    assert (scores["num_frames"], scores["height"], scores["width"]) == (NUM_FRAMES, HEIGHT, WIDTH)
    assert scores["warp_flow"] == "output" and scores["source"] is None


def test_known_translation_is_small_and_flicker_is_larger(tmp_path, capsys):
    source = save(translating_video(), tmp_path / "source")
    edited = save(translating_video() * 0.8, tmp_path / "edited")  # follows the source's motion
    flickering = save(flicker(translating_video()), tmp_path / "flicker")
    consistent = evaluate(capsys, edited, "--source", source)["warp_error"]
    flickery = evaluate(capsys, flickering, "--source", source)["warp_error"]
    assert consistent < 5e-3
    assert flickery > 0.03 and flickery > 10 * consistent


def test_json_goes_to_stdout_and_to_the_output_file(tmp_path, capsys):
    video = save(translating_video(), tmp_path / "video")
    output = tmp_path / "scores" / "video.json"
    printed = evaluate(capsys, video, "--output", output)
    assert json.loads(output.read_text()) == printed
    assert printed["video"] == str(video) and printed["warp_flow"] == "output"
    assert set(printed) >= {"num_frames", "height", "width", "frame_difference", "warp_error"}


def test_eval_reads_a_run_video(tmp_path, capsys):
    video = write_video(translating_video(), tmp_path / "video_by_bivdiff.mp4", fps=6.25)
    assert evaluate(capsys, video)["num_frames"] == NUM_FRAMES


def test_prompt_without_clip_is_noted_not_used(tmp_path, capsys):
    code, out, err = run_cli(capsys, "eval", save(static_video(), tmp_path / "v"), "--prompt", "a cat")
    assert code == 0 and "--prompt is only used with --clip" in err
    assert "clip_text_alignment" not in json.loads(out)


@pytest.mark.parametrize("flag", ["video", "--source", "--clip"])
def test_missing_paths_are_named(tmp_path, capsys, flag):
    video = save(static_video(), tmp_path / "v")
    args = {
        "video": [tmp_path / "none.mp4"],
        "--source": [video, "--source", tmp_path / "none"],
        "--clip": [video, "--clip", tmp_path / "no_clip"],
    }[flag]
    code, _, err = run_cli(capsys, "eval", *args)
    assert code == 1 and flag in err and ("none" in err or "no_clip" in err)
