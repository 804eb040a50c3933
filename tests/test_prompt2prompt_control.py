"""Prompt2Prompt attention control (pipelines/prompt2prompt_control.py) on tiny random SD components.

Oracles: the stock processors (inactive controller), the source branch (edit == source), single-frame runs
(frame independence), hand-made alignments and hand-placed attention maps.
"""

import ast
import pathlib
import warnings

import pytest
import torch

from bivdiff.pipelines import prompt2prompt_control as p2p
from bivdiff.tiny_models import tiny_scheduler, tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae

MODULE_PATH = pathlib.Path(p2p.__file__)
STEPS = 5


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(),
        tokenizer=tiny_tokenizer(),
        unet=tiny_unet(),
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def frame_noise(frames, h=16, w=16, seed=0):
    return torch.randn(frames, 4, h, w, generator=torch.Generator().manual_seed(seed))


def run(pipe, controller, source, edit, noise, guidance_scale=7.5, steps=STEPS, sdpa_when_idle=True):
    """The frame-wise stage as the pipeline runs it: prompts [src, edit] * F, each frame's noise for its pair."""
    frames, _, h, w = noise.shape
    with p2p.attention_control(pipe.unet, controller, sdpa_when_idle=sdpa_when_idle):
        controller.reset()
        out = pipe(
            [source, edit] * frames,
            latents=noise.repeat_interleave(2, dim=0),
            height=h * pipe.vae_scale_factor,
            width=w * pipe.vae_scale_factor,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            output_type="latent",
            callback_on_step_end=controller.callback_on_step_end,
        ).images
    return out.reshape(frames, 2, *out.shape[1:])


# ---------------------------------------------------------------------------------------------------------------
# module hygiene: loadable as a custom_pipeline sibling
# ---------------------------------------------------------------------------------------------------------------


def test_module_has_only_absolute_imports_and_no_pipeline_class():
    tree = ast.parse(MODULE_PATH.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import at line {node.lineno}"
            assert "DiffusionPipeline" not in {a.name for a in node.names}
        if isinstance(node, ast.ClassDef):
            assert all("Pipeline" not in ast.unparse(b) for b in node.bases), node.name


# ---------------------------------------------------------------------------------------------------------------
# processors: stock equivalence, restore
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sdpa_when_idle", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_inactive_controller_matches_stock_processors_and_restores(sdpa_when_idle, with_mask):
    unet = tiny_unet()
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(4, 4, 16, 16, generator=g)
    text = torch.randn(4, 77, 32, generator=g)
    kwargs = {}
    if with_mask:
        mask = torch.ones(4, 77)
        mask[:, 40:] = 0
        kwargs["encoder_attention_mask"] = mask
    stock_types = {k: type(v) for k, v in unet.attn_processors.items()}
    with torch.no_grad():
        expected = unet(sample, 500, encoder_hidden_states=text, **kwargs).sample
        for controller in (
            p2p.AttentionControl(STEPS, store_maps=True),
            p2p.AttentionReplace(tiny_tokenizer(), "a cat", "a dog", STEPS, 0.0, 0.0),
        ):
            prev = p2p.register_attention_control(unet, controller, sdpa_when_idle=sdpa_when_idle)
            assert all(isinstance(p, p2p.P2PAttnProcessor) for p in unet.attn_processors.values())
            got = unet(sample, 500, encoder_hidden_states=text, **kwargs).sample
            unet.set_attn_processor(prev)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == stock_types
    with torch.no_grad():
        assert torch.equal(unet(sample, 500, encoder_hidden_states=text, **kwargs).sample, expected)


def test_register_reports_place_and_downsampling():
    unet = tiny_unet()
    controller = p2p.AttentionControl(STEPS)
    with p2p.attention_control(unet, controller):
        layers = {name: proc.layer for name, proc in unet.attn_processors.items()}
    # tiny UNet in SD order: attention at full latent size in the first down and last up block, half size in the mid
    assert {(layer.place, layer.downsample) for layer in layers.values()} == {("down", 1), ("mid", 2), ("up", 1)}
    assert not any(isinstance(p, p2p.P2PAttnProcessor) for p in unet.attn_processors.values())


# ---------------------------------------------------------------------------------------------------------------
# edit == source: the edit branch reproduces the source branch
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit_type", ["replace", "refine"])
def test_identical_prompts_give_identical_branches(pipe, edit_type):
    prompt = "a red car on a road"
    controller = p2p.make_controller(
        pipe.tokenizer,
        prompt,
        prompt,
        edit_type,
        STEPS,
        cross_replace_steps=0.6,
        self_replace_steps=0.6,
        local_blend_words=("car", "car"),
        self_replace_query_fraction=1.0,
    )
    out = run(pipe, controller, prompt, prompt, frame_noise(2))
    torch.testing.assert_close(out[:, 1], out[:, 0], atol=1e-6, rtol=0)
    assert controller.cur_step == STEPS


# ---------------------------------------------------------------------------------------------------------------
# replace: stored maps follow the schedule
# ---------------------------------------------------------------------------------------------------------------


def test_replace_uses_source_maps_during_cross_replace_steps_only(pipe):
    source, edit = "a cat on a mat", "a dog on a mat"  # same token count with the byte-level tokenizer
    controller = p2p.make_controller(
        pipe.tokenizer,
        source,
        edit,
        "replace",
        STEPS,
        cross_replace_steps=0.4,
        self_replace_steps=0.0,
        store_maps=True,
    )
    assert controller.cross_replace_range == (0, 2)
    run(pipe, controller, source, edit, frame_noise(2))
    mapper = controller.mapper
    assert len(controller.attention_maps) == STEPS
    swapped = p2p.word_token_indices(pipe.tokenizer, edit, "dog")
    assert swapped == [2, 3, 4]
    for step, (used_step, raw_step) in enumerate(zip(controller.attention_maps, controller.raw_attention_maps)):
        assert len(used_step) == 4  # every cross-attention layer of the tiny UNet, every step
        for name, used in used_step.items():
            raw = raw_step[name]
            assert used.shape[:2] == (2, 2) and used.shape[-1] == 77
            torch.testing.assert_close(used[:, 0], raw[:, 0], atol=0, rtol=0)  # source branch untouched
            if step < 2:
                remapped = torch.einsum("fqi,ij->fqj", used[:, 0], mapper)
                torch.testing.assert_close(used[:, 1], remapped, atol=1e-6, rtol=0)
                # the edit's own maps of the swapped word differed: the replacement did something
                assert (raw[:, 1][..., swapped] - used[:, 1][..., swapped]).abs().max() > 1e-4
            else:
                torch.testing.assert_close(used[:, 1], raw[:, 1], atol=0, rtol=0)
                assert (used[:, 1] - used[:, 0]).abs().max() > 1e-4


def test_self_replacement_schedule_and_threshold(tokenizer):
    controller = p2p.AttentionReplace(
        tokenizer, "a cat", "a dog", 10, cross_replace_steps=0.0, self_replace_steps=(0.2, 0.5)
    )
    assert controller.self_replace_range == (2, 5)
    heads, q = 2, 16
    probs = torch.rand(2 * 2 * 2 * heads, q, q).softmax(-1)  # CFG, 2 frames
    coarse = p2p.AttentionLayer("up_blocks.1.x", "up", 4)  # 16x16 at 512 px: replaced by default
    fine = p2p.AttentionLayer("up_blocks.2.x", "up", 2)  # 32x32 at 512 px: kept by default
    for step in range(10):
        controller.cur_step = step
        for layer in (coarse, fine):
            controller._seen.clear()
            active = controller.needs_probs(layer, is_cross=False)
            out = controller(probs.clone(), False, layer, heads) if active else probs
            expect_replaced = 2 <= step < 5 and layer is coarse
            assert active == expect_replaced
            pairs = out[4 * heads :].reshape(2, 2, heads, q, q)
            torch.testing.assert_close(out[: 4 * heads], probs[: 4 * heads], atol=0, rtol=0)  # uncond untouched
            src = probs[4 * heads :].reshape(2, 2, heads, q, q)
            torch.testing.assert_close(pairs[:, 0], src[:, 0], atol=0, rtol=0)
            if expect_replaced:
                torch.testing.assert_close(pairs[:, 1], src[:, 0], atol=0, rtol=0)
            else:
                torch.testing.assert_close(pairs[:, 1], src[:, 1], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# refine: alignment, mapper, mixing
# ---------------------------------------------------------------------------------------------------------------


def test_global_alignment_hand_made():
    expected = [(0, 0), (1, None), (None, 1), (2, 2), (3, 3), (None, 4)]
    assert p2p.global_alignment([1, 2, 3, 4], [1, 5, 3, 4, 6]) == expected
    # a repeated token: the insertion goes before the matched suffix
    assert p2p.global_alignment(list("ac"), list("abcc")) == [(0, 0), (None, 1), (None, 2), (1, 3)]
    assert p2p.global_alignment([], [7]) == [(None, 0)]


def test_refinement_mapper_hand_made(tokenizer):
    # byte-level tokens: "a cat" = BOS a</w> c a t</w> EOS; "a black cat" = BOS a</w> b l a c k</w> c a t</w> EOS
    mapper, alphas = p2p.refinement_mapper(tokenizer, "a cat", "a black cat")
    assert mapper.shape == alphas.shape == (77,)
    assert alphas[:11].tolist() == [1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert mapper[[0, 1, 7, 8, 9, 10]].tolist() == [0, 1, 2, 3, 4, 5]
    # positions after the edited prompt map to the same positions of the source, as in the original
    assert mapper[11:14].tolist() == [11, 12, 13] and mapper[-1].item() == 76 and bool(alphas[11:].eq(1).all())
    # removing a word: every edited token is aligned
    mapper, alphas = p2p.refinement_mapper(tokenizer, "a big cat", "a cat")
    assert alphas[:6].tolist() == [1] * 6
    assert mapper[:6].tolist() == [0, 1, 5, 6, 7, 8]


def test_refine_mixes_source_and_edit_maps(pipe):
    source, edit = "a cat", "a black cat"
    controller = p2p.make_controller(
        pipe.tokenizer, source, edit, "refine", STEPS, cross_replace_steps=0.4, self_replace_steps=0.0, store_maps=True
    )
    run(pipe, controller, source, edit, frame_noise(1))
    a = controller.alphas
    for step in range(STEPS):
        for name, used in controller.attention_maps[step].items():
            raw = controller.raw_attention_maps[step][name]
            if step < 2:
                expected = raw[:, 0][..., controller.mapper] * a + raw[:, 1] * (1 - a)
            else:
                expected = raw[:, 1]
            torch.testing.assert_close(used[:, 1], expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# local blend
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent_hw", [(16, 16), (24, 32)])
def test_local_blend_masks_have_latent_size_and_are_binary(pipe, latent_hw):
    source, edit = "a cat on a mat", "a dog on a mat"
    controller = p2p.make_controller(
        pipe.tokenizer, source, edit, "replace", STEPS, local_blend_words=("cat", "dog"), local_blend_threshold=0.3
    )
    out = run(pipe, controller, source, edit, frame_noise(2, *latent_hw))
    mask = controller.local_blend.last_mask
    assert mask.shape == (2, 1, *latent_hw)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
    # Random tiny attention covers the whole latent at 0.3; nothing passes a threshold of 1.0 (maps are normalised
    # to a maximum of 1), so there every pixel is outside the mask and the edit must equal the source.
    controller = p2p.make_controller(
        pipe.tokenizer, source, edit, "replace", STEPS, local_blend_words=("cat", "dog"), local_blend_threshold=1.0
    )
    out = run(pipe, controller, source, edit, frame_noise(2, *latent_hw))
    assert controller.local_blend.last_mask.sum() == 0
    assert torch.equal(out[:, 1], out[:, 0])  # outside the mask the edit is the source


def test_local_blend_mask_from_hand_placed_maps():
    blend = p2p.LocalBlend("car", threshold=0.3)
    blend.word_alphas = torch.zeros(2, 5)
    blend.word_alphas[:, 2] = 1  # token 2 is the blend word in both prompts
    coarse = p2p.AttentionLayer("up_blocks.1.attn2", "up", 4)
    fine = p2p.AttentionLayer("up_blocks.2.attn2", "up", 2)
    h, w = 24, 32  # coarse maps are 6x8, fine 12x16
    maps = torch.zeros(1, 2, 6 * 8, 5)
    maps[0, 0, 2 * 8 + 3, 2] = 1.0  # source: peak at (2, 3) of the 6x8 map
    maps[0, 1, 4 * 8 + 6, 2] = 1.0  # edit: peak at (4, 6)
    blend.accumulate(coarse, maps)
    blend.accumulate(fine, torch.rand(1, 2, 12 * 16, 5))  # 32x32-at-512 layer: not used by default
    mask = blend.mask(h, w)
    expected = torch.zeros(6, 8)
    expected[1:4, 2:5] = 1  # 3x3 max-pool around each peak, then each map cell -> 4x4 latent pixels
    expected[3:6, 5:8] = 1
    expected = expected.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.equal(mask[0, 0], expected)
    latents = torch.randn(2, 4, h, w)
    blended = blend(latents)
    assert torch.equal(blended[0], latents[0])
    torch.testing.assert_close(blended[1], latents[0] + expected * (latents[1] - latents[0]))


def test_local_blend_words_forms(tokenizer):
    assert p2p.LocalBlend("car").source_words == ["car"]
    lb = p2p.LocalBlend(("car", ["red", "bicycle"]))
    assert (lb.source_words, lb.edit_words) == (["car"], ["red", "bicycle"])
    lb = p2p.LocalBlend(["car"])
    assert (lb.source_words, lb.edit_words) == (["car"], ["car"])
    lb.bind(tokenizer, "a red car", "a blue car")
    assert lb.word_alphas[0].nonzero().flatten().tolist() == [5, 6, 7]
    assert lb.word_alphas[1].nonzero().flatten().tolist() == [6, 7, 8]


# ---------------------------------------------------------------------------------------------------------------
# frames are independent
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_frames_are_independent(pipe, guidance_scale):
    source, edit = "a cat on a mat", "a dog on a mat"

    def controller():
        return p2p.make_controller(
            pipe.tokenizer,
            source,
            edit,
            "replace",
            STEPS,
            cross_replace_steps=0.6,
            self_replace_steps=0.6,
            local_blend_words=("cat", "dog"),
            self_replace_query_fraction=1.0,
            do_classifier_free_guidance=guidance_scale > 1,
        )

    noise = frame_noise(2, seed=3)
    both_ctrl = controller()
    both = run(pipe, both_ctrl, source, edit, noise, guidance_scale=guidance_scale)
    mask_both = both_ctrl.local_blend.last_mask
    for f in range(2):
        single_ctrl = controller()
        single = run(pipe, single_ctrl, source, edit, noise[f : f + 1], guidance_scale=guidance_scale)
        torch.testing.assert_close(both[f], single[0], atol=1e-5, rtol=0)
        assert torch.equal(mask_both[f], single_ctrl.local_blend.last_mask[0])
    assert (both[0] - both[1]).abs().max() > 1e-3
    assert (both[:, 1] - both[:, 0]).abs().max() > 1e-3  # the edit did something


# ---------------------------------------------------------------------------------------------------------------
# steps, reset, misuse
# ---------------------------------------------------------------------------------------------------------------


def test_reset_clears_state_and_missing_callback_warns(pipe):
    source, edit = "a cat", "a dog"
    controller = p2p.make_controller(
        pipe.tokenizer, source, edit, "replace", STEPS, local_blend_words="a", store_maps=True
    )
    run(pipe, controller, source, edit, frame_noise(1), steps=2)
    assert controller.cur_step == 2 and controller.attention_maps and controller.local_blend.last_mask is not None
    controller.reset()
    assert controller.cur_step == 0 and not controller.attention_maps and controller.local_blend.last_mask is None
    unet = pipe.unet
    text = torch.randn(4, 77, 32)
    with p2p.attention_control(unet, controller), torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            unet(torch.randn(4, 4, 16, 16), 10, encoder_hidden_states=text)
    assert any("step_callback" in str(w.message) for w in caught)


def test_bad_batch_layout_is_reported(tokenizer):
    controller = p2p.AttentionReplace(tokenizer, "a cat", "a dog", STEPS)
    layer = p2p.AttentionLayer("down_blocks.1.attn2", "down", 2)
    with pytest.raises(ValueError, match="pairs"):
        controller(torch.rand(2 * 3 * 4, 8, 77), True, layer, 4)  # CFG batch of 6: conditional half of 3


def test_cfg_flag_mismatch_is_reported(pipe):
    # without CFG, 2 frames make a UNet batch of 4, which a CFG controller would read as 1 frame + uncond half
    controller = p2p.make_controller(pipe.tokenizer, "a cat", "a dog", "replace", STEPS)
    with pytest.raises(ValueError, match="do_classifier_free_guidance=True does not match"):
        run(pipe, controller, "a cat", "a dog", frame_noise(2), guidance_scale=1.0)


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------


def test_replace_with_different_token_counts_is_refused(tokenizer):
    with pytest.raises(ValueError, match="same number of tokens.*'refine'"):
        p2p.check_prompt2prompt_inputs(tokenizer, "a car", "a bicycle", "replace")
    with pytest.raises(ValueError, match="refine"):
        p2p.make_controller(tokenizer, "a car", "a bicycle", "replace", STEPS)
    p2p.check_prompt2prompt_inputs(tokenizer, "a car", "a bicycle", "refine")  # fine for refine


def test_local_blend_word_missing_is_named(tokenizer):
    with pytest.raises(ValueError, match=r"'truck'.*edited prompt 'a red bicycle'"):
        p2p.check_prompt2prompt_inputs(tokenizer, "a red car", "a red bicycle", "refine", ("car", "truck"))
    with pytest.raises(ValueError, match=r"'car'.*source prompt 'a scar'"):
        p2p.make_controller(tokenizer, "a scar", "a car", "refine", STEPS, local_blend_words="car")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(edit_type="swap"), "Unknown Prompt2Prompt edit_type 'swap'"),
        (dict(edit_type="reweight"), "needs `reweight`"),
        (dict(edit_type="refine", reweight={"blue": 2.0}), "'blue' .* is not a word of the edited prompt"),
        (dict(edit_type="refine", cross_replace_steps={"red": (0.6, 0.2)}), r"cross_replace_steps\['red'\]"),
        (dict(edit_type="refine", cross_replace_steps=1.5), "cross_replace_steps"),
        (dict(edit_type="refine", self_replace_steps=(0.5, 0.2)), "self_replace_steps"),
        (dict(edit_type="refine", local_blend_words="car", local_blend_threshold=2.0), "local_blend_threshold"),
    ],
)
def test_other_validation_errors(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        p2p.check_prompt2prompt_inputs(tokenizer, "a car", "a red car", **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# the original's replace-step forms and reweighting
# ---------------------------------------------------------------------------------------------------------------


def original_window(start, end, num_steps):
    """The original's rows of an (N + 1)-row table: int(start * (N + 1)) <= i < int(end * (N + 1))."""
    return [int(start * (num_steps + 1)) <= i < int(end * (num_steps + 1)) for i in range(num_steps + 1)]


@pytest.mark.parametrize("value, window", [(0.5, (0.0, 0.5)), (0.4, (0.0, 0.4)), ((0.2, 0.9), (0.2, 0.9))])
def test_cross_replace_window_rounds_as_the_original(tokenizer, value, window):
    alphas = p2p.cross_replace_alphas(tokenizer, "a red car", value, STEPS)
    assert alphas.shape == (STEPS + 1, 77)
    assert alphas[:, 0].bool().tolist() == original_window(*window, STEPS)
    assert (alphas == alphas[:, :1]).all()  # every token alike without per-word keys


def test_cross_replace_per_word_dict_gives_each_word_its_window(tokenizer):
    prompt = "a red car on a road"
    alphas = p2p.cross_replace_alphas(tokenizer, prompt, {"default_": 0.2, "red": (0.4, 1.0), "road": 0.6}, STEPS)
    red, road = (p2p.word_token_indices(tokenizer, prompt, w) for w in ("red", "road"))
    others = [i for i in range(77) if i not in red + road]
    for i in red:
        assert alphas[:, i].bool().tolist() == original_window(0.4, 1.0, STEPS)
    for i in road:
        assert alphas[:, i].bool().tolist() == original_window(0.0, 0.6, STEPS)
    assert (alphas[:, others].bool() == torch.tensor(original_window(0.0, 0.2, STEPS))[:, None]).all()
    # without "default_" the other tokens are on at every step, as the original's (0, 1)
    assert p2p.cross_replace_alphas(tokenizer, prompt, {"red": 0.2}, STEPS)[:, others].all()


def test_reweight_with_strength_one_and_identical_prompts_is_no_edit(pipe):
    prompt = "a red car on a road"
    controller = p2p.make_controller(
        pipe.tokenizer, prompt, prompt, "reweight", STEPS, 0.8, 0.4, reweight={"red": 1.0, "car": 1.0}
    )
    out = run(pipe, controller, prompt, prompt, frame_noise(1))
    torch.testing.assert_close(out[:, 1], out[:, 0], atol=1e-6, rtol=0)


def test_reweight_scales_each_word_of_the_source_maps_within_its_window(pipe):
    source, edit = "a red car", "a red car"
    strengths = {"red": 2.0, "car": 0.5}
    controller = p2p.make_controller(
        pipe.tokenizer, source, edit, "reweight", STEPS, 0.5, 0.0, reweight=strengths, store_maps=True
    )
    out = run(pipe, controller, source, edit, frame_noise(1))
    scale = torch.ones(77)
    for word, strength in strengths.items():
        scale[p2p.word_token_indices(pipe.tokenizer, edit, word)] = strength
    for step in range(STEPS):
        for name, used in controller.attention_maps[step].items():
            raw = controller.raw_attention_maps[step][name]
            expected = raw[:, 0] * scale if original_window(0, 0.5, STEPS)[step] else raw[:, 1]
            torch.testing.assert_close(used[:, 1], expected, atol=1e-6, rtol=0)
    assert (out[:, 1] - out[:, 0]).abs().max() > 1e-4


def test_reweight_scales_a_replace_edit(pipe):
    source, edit = "a cat on a mat", "a dog on a mat"
    controller = p2p.make_controller(
        pipe.tokenizer, source, edit, "replace", STEPS, 0.4, 0.0, reweight={"dog": 3.0}, store_maps=True
    )
    run(pipe, controller, source, edit, frame_noise(1))
    dog = p2p.word_token_indices(pipe.tokenizer, edit, "dog")
    for name, used in controller.attention_maps[0].items():
        remapped = torch.einsum("fqi,ij->fqj", controller.raw_attention_maps[0][name][:, 0], controller.mapper)
        torch.testing.assert_close(used[:, 1][..., dog], 3.0 * remapped[..., dog], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# local blend, piece by piece
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "queries, height, width, downsample, expected",
    [
        (48, 24, 32, 4, (6, 8)),  # the layer's own downsampling
        (221, 25, 33, 2, (13, 17)),  # odd latents: convolutions round up ...
        (192, 25, 33, None, (12, 16)),  # ... or down; unknown downsampling: 1, 2, 4, ... are tried
        (8, 6, 12, 3, (2, 4)),  # a downsampling that is no power of two is only found from the layer
        (16, 64, 64, None, (4, 4)),
    ],
)
def test_attention_map_size_from_its_query_count(queries, height, width, downsample, expected):
    assert p2p._map_hw(queries, height, width, downsample) == expected


def test_an_attention_map_that_fits_no_downsampling_is_refused():
    with pytest.raises(ValueError, match="cannot place 7 attention queries on a 8x8 latent"):
        p2p._map_hw(7, 8, 8, None)


def test_local_blend_reads_down_and_up_layers_only():
    assert [p2p.LocalBlend.uses(p2p.AttentionLayer("a", place, 2)) for place in ("down", "mid", "up", "other")] == [
        True,
        False,
        True,
        False,
    ]


def test_local_blend_binds_source_words_to_the_source_prompt_and_edited_words_to_the_edited_one(tokenizer):
    blend = p2p.LocalBlend(("cat", "dog")).bind(tokenizer, "a cat sits", "a big dog sits")
    expected = torch.zeros_like(blend.word_alphas)
    expected[0, p2p.word_token_indices(tokenizer, "a cat sits", "cat")] = 1.0
    expected[1, p2p.word_token_indices(tokenizer, "a big dog sits", "dog")] = 1.0
    assert torch.equal(blend.word_alphas, expected)
    for words, which in ((("owl", "dog"), "source"), (("cat", "owl"), "edited")):
        with pytest.raises(ValueError, match=f"'owl' is not a word of the {which} prompt"):
            p2p.LocalBlend(words).bind(tokenizer, "a cat sits", "a big dog sits")


def test_local_blend_sums_each_layers_word_maps_over_the_steps():
    blend = p2p.LocalBlend("car")
    blend.word_alphas = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    layer = p2p.AttentionLayer("up_blocks.1.attn2", "up", 4)
    steps = [torch.rand(2, 2, 4, 3, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for maps in steps:
        blend.accumulate(layer, maps)
    # Source row: token 1's map; edited row: token 2's; summed over both steps.
    expected = torch.stack([sum(m[:, 0, :, 1] for m in steps), sum(m[:, 1, :, 2] for m in steps)], dim=1)
    torch.testing.assert_close(blend._sums[layer.name], expected)


def test_local_blend_uses_the_small_layers_or_else_the_smallest_ones():
    blend = p2p.LocalBlend("car", query_fraction=1 / 4)
    blend.word_alphas = torch.ones(2, 3)
    quarter, sixteenth = p2p.AttentionLayer("q", "up", 2), p2p.AttentionLayer("s", "up", 4)
    blend.accumulate(quarter, torch.rand(1, 2, 16, 3))
    blend.accumulate(sixteenth, torch.rand(1, 2, 4, 3))
    assert blend._selected() == ["q", "s"]  # both have at most a quarter of the latent's queries
    blend.query_fraction = 1 / 64
    assert blend._selected() == ["s"]  # none that small: the lowest resolution there is


def test_local_blend_averages_maps_of_two_resolutions_at_the_finer_one():
    """Oracle: each map brought to the finest map size (nearest), averaged, 3x3 max-pooled, brought to the latent
    size, divided by its maximum and thresholded; the layer listed first is the coarse one."""
    import torch.nn.functional as F

    blend = p2p.LocalBlend("car", threshold=0.5, query_fraction=1 / 4)
    blend.word_alphas = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    coarse, fine = p2p.AttentionLayer("c", "up", 4), p2p.AttentionLayer("f", "up", 2)
    # The source prompt's maps weaker than the edited one's: each prompt is normalised by its own maximum.
    # Source words near the top left, edited words near the bottom right, at each resolution.
    coarse_maps, fine_maps = torch.zeros(1, 2, 2 * 3, 2), torch.zeros(1, 2, 4 * 6, 2)
    coarse_maps[0, 0, 0, 1], coarse_maps[0, 1, 3 + 2, 1] = 0.2, 1.0
    fine_maps[0, 0, 0, 1], fine_maps[0, 1, 6 * 3 + 5, 1] = 0.3, 1.5
    blend.accumulate(coarse, coarse_maps)
    blend.accumulate(fine, fine_maps)
    mask = blend.mask(8, 12)
    maps = [coarse_maps[0, :, :, 1].reshape(2, 1, 2, 3), fine_maps[0, :, :, 1].reshape(2, 1, 4, 6)]
    average = (F.interpolate(maps[0], size=(4, 6), mode="nearest") + maps[1]) / 2
    pooled = F.interpolate(F.max_pool2d(average, 3, 1, 1), size=(8, 12), mode="nearest")
    per_prompt = (pooled / pooled.amax(dim=(-2, -1), keepdim=True)) > 0.5
    assert torch.equal(mask, (per_prompt[0] | per_prompt[1]).float()[None])
    assert 0 < mask.mean() < 1


def test_an_unbound_local_blend_says_how_to_bind_it():
    with pytest.raises(RuntimeError, match="not bound to prompts"):
        p2p.LocalBlend("car").accumulate(p2p.AttentionLayer("a", "up", 2), torch.rand(1, 2, 4, 3))
