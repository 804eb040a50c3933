import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from bivdiff import BIVDiffDDIMInverseScheduler
from bivdiff.tiny_models import sd15_scheduler_config


def reference_reverse_step(eps, t, z, alphas_cumprod, step_ratio, last):
    """The original BIVDiff `reverse_step`, written out: evaluate at t, move to min(t + T/N, T - 2)."""
    a_t = alphas_cumprod[t]
    a_next = alphas_cumprod[min(t + step_ratio, last)]
    x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps


@pytest.fixture
def scheduler():
    return BIVDiffDDIMInverseScheduler.from_config(DDIMScheduler(**sd15_scheduler_config()).config)


def test_timesteps_for_50_steps_ascend_from_1_to_981(scheduler):
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(1, 1000, 20))
    assert scheduler.next_timestep(981) == 998
    # The same levels DDIM denoises over, in reverse order.
    ddim = DDIMScheduler(**sd15_scheduler_config())
    ddim.set_timesteps(50)
    assert scheduler.timesteps.tolist() == ddim.timesteps.flip(0).tolist()


def test_step_matches_the_original_reverse_step(scheduler):
    scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=generator)
    alphas = DDIMScheduler(**sd15_scheduler_config()).alphas_cumprod
    for t in scheduler.timesteps.tolist():
        eps = torch.randn(z.shape, generator=generator)
        expected = reference_reverse_step(eps, t, z, alphas, 20, 998)
        z = scheduler.step(eps, t, z).prev_sample
        torch.testing.assert_close(z, expected, rtol=0, atol=1e-5)
        z = expected


def test_v_prediction_inverts_the_v_parameterisation():
    scheduler = BIVDiffDDIMInverseScheduler(**{**sd15_scheduler_config(), "prediction_type": "v_prediction"})
    scheduler.set_timesteps(10)
    t = 101
    a = scheduler.alphas_cumprod[t]
    x0 = torch.randn(1, 4, 4, 4)
    eps = torch.randn(1, 4, 4, 4)
    z = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    out = scheduler.step(v, t, z)
    torch.testing.assert_close(out.pred_original_sample, x0, atol=1e-5, rtol=0)
    a_next = scheduler.alphas_cumprod[t + 100]
    torch.testing.assert_close(out.prev_sample, a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps, atol=1e-5, rtol=0)


def test_from_config_of_other_schedulers_keeps_betas_and_offset():
    pndm = PNDMScheduler(**{k: v for k, v in sd15_scheduler_config().items() if k not in ("clip_sample",)})
    inv = BIVDiffDDIMInverseScheduler.from_config(pndm.config)
    torch.testing.assert_close(inv.alphas_cumprod, pndm.alphas_cumprod)
    inv.set_timesteps(50)
    assert inv.timesteps[0].item() == 1


def test_alphas_stay_fp32_for_half_samples(scheduler):
    scheduler.set_timesteps(50)
    z = torch.randn(1, 4, 4, 4)
    eps = torch.randn(1, 4, 4, 4)
    half = scheduler.step(eps.half(), 981, z.half()).prev_sample
    assert half.dtype == torch.float16
    assert scheduler.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(half.float(), scheduler.step(eps, 981, z).prev_sample, atol=1e-2, rtol=1e-2)


def test_step_before_set_timesteps_is_an_error():
    with pytest.raises(ValueError, match="set_timesteps"):
        BIVDiffDDIMInverseScheduler().step(torch.zeros(1), 1, torch.zeros(1))


def test_save_and_reload(tmp_path, scheduler):
    scheduler.save_pretrained(tmp_path)
    again = BIVDiffDDIMInverseScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(scheduler.config)
    torch.testing.assert_close(again.alphas_cumprod, scheduler.alphas_cumprod)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 10, 50])
def test_every_step_moves_towards_noise_along_the_given_timesteps(spacing, steps):
    scheduler = BIVDiffDDIMInverseScheduler(**{**sd15_scheduler_config(), "timestep_spacing": spacing})
    assert scheduler.timesteps[0] < scheduler.timesteps[-1]  # ascending before set_timesteps too
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    assert timesteps == sorted(timesteps)
    for i, t in enumerate(timesteps):
        following = scheduler.next_timestep(t)
        assert following >= t
        if i + 1 < len(timesteps):
            assert following == timesteps[i + 1]


@pytest.mark.parametrize("steps", [3, 7, 30, 50])
def test_leading_timesteps_are_ddims_in_reverse_for_any_step_count(steps):
    """Oracle: with leading spacing the inversion evaluates the UNet on exactly the levels DDIM denoises over,
    including step counts that do not divide T (their stride is T // N, as DDIM's)."""
    scheduler = BIVDiffDDIMInverseScheduler(**sd15_scheduler_config())
    ddim = DDIMScheduler(**sd15_scheduler_config())
    scheduler.set_timesteps(steps)
    ddim.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == ddim.timesteps.flip(0).tolist()
    assert scheduler.timesteps.dtype == torch.int64


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_a_step_count_outside_one_to_t_is_refused(scheduler, steps):
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\]"):
        scheduler.set_timesteps(steps)


def test_an_off_grid_timestep_moves_up_by_the_step_stride_and_stops_at_the_last_level(scheduler):
    scheduler.set_timesteps(50)
    assert scheduler.next_timestep(5) == 25  # 5 + 1000 // 50
    assert scheduler.next_timestep(torch.tensor(990)) == 999  # min(1010, T - 1)
    scheduler.set_timesteps(3)
    assert scheduler.next_timestep(5) == 338  # a whole stride, 1000 // 3


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_every_parameterisation_moves_a_noisy_sample_to_the_next_level(prediction_type):
    """Oracle: z_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps; whichever of eps, v or x0 the model predicts, the step
    returns x0 and z_next = sqrt(a_next) x0 + sqrt(1 - a_next) eps."""
    scheduler = BIVDiffDDIMInverseScheduler(**{**sd15_scheduler_config(), "prediction_type": prediction_type})
    scheduler.set_timesteps(10)
    t, generator = 201, torch.Generator().manual_seed(1)
    a, a_next = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[301]
    x0, eps = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)
    z = a.sqrt() * x0 + (1 - a).sqrt() * eps
    output = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]
    z_next, predicted = scheduler.step(output, t, z, return_dict=False)
    torch.testing.assert_close(predicted, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(z_next, a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps, atol=1e-5, rtol=0)


def test_a_half_precision_step_is_computed_in_fp32_and_returned_in_the_samples_dtype(scheduler):
    """Oracle: the fp32 step on the same (half-representable) inputs, rounded once to fp16 at the end."""
    scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 8, 8, generator=generator).half()
    eps = torch.randn(1, 4, 8, 8, generator=generator).half()
    half = scheduler.step(eps, 981, z)
    full = scheduler.step(eps.float(), 981, z.float())
    assert half.prev_sample.dtype == half.pred_original_sample.dtype == torch.float16
    torch.testing.assert_close(half.prev_sample, full.prev_sample.half(), atol=0, rtol=0)
    torch.testing.assert_close(half.pred_original_sample, full.pred_original_sample.half(), atol=0, rtol=0)


def test_linspace_and_trailing_inversion_climb_from_the_clean_level_through_the_documented_grid():
    """Linspace: the levels round(linspace(0, T - 1, N + 1)); trailing: 0, then round(T - i T / N) - 1. Each
    step goes from one level to the next, so the inversion starts on the clean level 0 and ends on T - 1."""
    grids = {
        "linspace": [0, 100, 200, 300, 400, 500, 599, 699, 799, 899, 999],
        "trailing": [0, 99, 199, 299, 399, 499, 599, 699, 799, 899, 999],
    }
    for spacing, levels in grids.items():
        scheduler = BIVDiffDDIMInverseScheduler(**{**sd15_scheduler_config(), "timestep_spacing": spacing})
        scheduler.set_timesteps(10)
        assert scheduler.timesteps.tolist() == levels[:-1], spacing
        assert [scheduler.next_timestep(t) for t in levels[:-1]] == levels[1:], spacing
