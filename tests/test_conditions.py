"""Condition videos and masks: canny edges, outpainting bands, mask binarising, the annotators' install hint."""

import sys

import numpy as np
import pytest
from PIL import Image

from bivdiff import conditions
from bivdiff.errors import UserError


def square_frame(size=32, box=(8, 8, 24, 24)) -> Image.Image:
    array = np.zeros((size, size, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = 255
    return Image.fromarray(array)


def test_canny_finds_the_edges_of_a_square():
    edges = np.asarray(conditions.canny_frames([square_frame()])[0])
    assert edges.shape == (32, 32, 3)
    on = edges[..., 0] > 0
    assert on[8:24, 7:9].any() and on[8:24, 23:25].any()  # left and right sides
    assert not on[12:20, 12:20].any() and not on[:4].any()  # inside and far outside
    assert set(np.unique(edges)) <= {0, 255}


def test_canny_for_t2i_adapter_is_one_channel():
    assert conditions.condition_channels("T2IAdapter", "canny") == 1
    assert conditions.condition_channels("T2IAdapter", "depth_midas") == 3
    assert conditions.condition_channels("ControlNet", "canny") == 3
    assert conditions.canny_frames([square_frame()], channels=1)[0].mode == "L"


def test_canny_thresholds_matter():
    ramp = Image.fromarray(np.tile(np.linspace(0, 60, 32, dtype=np.uint8), (32, 1))[..., None].repeat(3, 2))
    assert np.asarray(conditions.canny_frames([ramp], 1, 2)[0]).any()
    assert not np.asarray(conditions.canny_frames([ramp], 100, 200)[0]).any()


@pytest.mark.parametrize(
    "mask_type, white, black",
    [
        (
            "horizontal",
            [(0, slice(None)), (15, slice(None)), (48, slice(None)), (63, slice(None))],
            [(16, 0), (47, 5)],
        ),
        ("vertical", [(slice(None), 0), (slice(None), 7), (slice(None), 24), (slice(None), 31)], [(0, 8), (63, 23)]),
    ],
)
def test_outpainting_masks_are_the_original_bands(mask_type, white, black):
    masks = conditions.outpainting_masks(3, height=64, width=32, mask_type=mask_type)
    assert len(masks) == 3
    mask = np.asarray(masks[0])
    assert mask.shape == (64, 32)
    for index in white:
        assert (mask[index] == 255).all()
    for index in black:
        assert mask[index] == 0
    assert (mask == 255).mean() == pytest.approx(0.5)


def test_binarise_masks_removes_compression_greys():
    grey = Image.fromarray(np.array([[0, 100, 127], [128, 200, 255]], dtype=np.uint8))
    assert np.asarray(conditions.binarise_masks([grey])[0]).tolist() == [[0, 0, 0], [255, 255, 255]]


def test_missing_annotators_say_how_to_install_them(monkeypatch):
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)  # makes `import controlnet_aux` fail
    with pytest.raises(UserError) as err:
        conditions.check_annotators_installed("depth_midas", "IDM.ControlNet.condition")
    message = str(err.value)
    assert 'pip install "bivdiff[annotators]"' in message
    assert "IDM.ControlNet.condition=canny" in message and "IDM.ControlNet.condition_video=PATH" in message


def test_canny_needs_no_annotator(monkeypatch):
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)
    conditions.check_annotators_installed("canny", "IDM.ControlNet.condition")
    assert not conditions.needs_annotator("canny") and conditions.needs_annotator("openpose")
