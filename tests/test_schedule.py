"""Tests for ctrlora_core.schedule: SD1.5 betas, forward process and DDIM."""
from __future__ import annotations

import math

import pytest
import torch

from ctrlora_core.schedule import NoiseSchedule, classifier_free_guidance, ddim_timesteps

SCHEDULE = NoiseSchedule()


def alpha_bar(t: int) -> float:
    """abar_t from the definition, in float64 Python: prod_{i<=t} (1 - beta_i)."""
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    betas = [(lo + (hi - lo) * i / 999) ** 2 for i in range(t + 1)]
    return math.prod(1 - beta for beta in betas)


def test_betas_are_the_sd15_scaled_linear_schedule():
    betas = SCHEDULE.betas
    assert betas.dtype == torch.float32 and betas.shape == (1000,)
    assert SCHEDULE.num_timesteps == 1000
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-6)
    steps = betas.double().sqrt().diff()
    torch.testing.assert_close(steps, torch.full_like(steps, (math.sqrt(0.012) - math.sqrt(0.00085)) / 999))


def test_alphas_cumprod_is_decreasing_and_matches_the_definition():
    abar = SCHEDULE.alphas_cumprod
    assert abar.dtype == torch.float32
    assert bool((abar.diff() < 0).all()) and 0 < abar[-1] < abar[0] < 1
    for t in (0, 1, 499, 999):
        assert abar[t].item() == pytest.approx(alpha_bar(t), rel=1e-6)


def test_q_sample_matches_the_closed_form():
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 250, 999])
    x_t = SCHEDULE.q_sample(x0, t, noise)
    for i, step in enumerate(t.tolist()):
        expected = math.sqrt(alpha_bar(step)) * x0[i] + math.sqrt(1 - alpha_bar(step)) * noise[i]
        torch.testing.assert_close(x_t[i], expected, rtol=1e-5, atol=1e-5)


def test_eps_target_is_the_noise():
    noise = torch.randn(2, 4, 4, 4)
    assert NoiseSchedule.eps_target(noise) is noise


def test_predict_x0_inverts_q_sample():
    x0 = torch.randn(4, 4, 16, 16, dtype=torch.float64)
    noise = torch.randn(4, 4, 16, 16, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    x_t = SCHEDULE.q_sample(x0, t, noise)
    assert x_t.dtype == torch.float64
    torch.testing.assert_close(SCHEDULE.predict_x0(x_t, t, noise), x0, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("t", "message"),
    [
        (torch.tensor([1, 2], dtype=torch.int32), r"t: expected an int64 tensor of shape \[2\], got torch.int32"),
        (torch.tensor([1, 2, 3]), r"t: expected an int64 tensor of shape \[2\], got torch.int64 of shape \[3\]"),
        (torch.tensor([5, 1000]), r"t: expected timesteps in \[0, 1000\), got \[5, 1000\]"),
        (torch.tensor([-1, 3]), r"t: expected timesteps in \[0, 1000\)"),
    ],
)
def test_bad_timesteps_are_rejected(t, message):
    with pytest.raises(ValueError, match=message):
        SCHEDULE.q_sample(torch.zeros(2, 4), t, torch.zeros(2, 4))


def test_ddim_timesteps_match_the_official_uniform_spacing():
    # Official: c = 1000 // n; steps = range(0, 1000, c) + 1.
    assert ddim_timesteps(20) == [1 + 50 * k for k in range(20)]
    assert ddim_timesteps(20)[-1] == 951
    assert ddim_timesteps(50) == [1 + 20 * k for k in range(50)]
    assert ddim_timesteps(50)[-1] == 981
    # 30 does not divide 1000: c = 33 and range(0, 1000, 33) has 31 entries.
    assert len(ddim_timesteps(30)) == 31 and ddim_timesteps(30)[-1] == 991
    assert ddim_timesteps(500)[-1] == 999


@pytest.mark.parametrize("num_steps", [0, 501])
def test_ddim_timesteps_reject_bad_counts(num_steps):
    with pytest.raises(ValueError, match=f"num_steps: expected 1..500, got {num_steps}"):
        ddim_timesteps(num_steps)


def test_ddim_step_with_the_true_noise_moves_along_the_forward_process():
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    x_t = SCHEDULE.q_sample(x0, torch.tensor([801, 801]), noise)
    x_prev = SCHEDULE.ddim_step(x_t, noise, 801, 751)
    torch.testing.assert_close(x_prev, SCHEDULE.q_sample(x0, torch.tensor([751, 751]), noise))
    with pytest.raises(ValueError, match="expected 0 <= t_prev < t, got t=751, t_prev=801"):
        SCHEDULE.ddim_step(x_t, noise, 751, 801)


@pytest.mark.parametrize("num_steps", [20, 50])
def test_ddim_sample_with_a_perfect_oracle_recovers_x0(num_steps):
    shape = (2, 4, 8, 8)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seen_t: list[int] = []

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.int64 and t.shape == (2,)
        seen_t.append(int(t[0]))
        signal = SCHEDULE.alphas_cumprod[t].double().sqrt().view(-1, 1, 1, 1)
        return (x_t - signal * x0) / (1 - signal**2).sqrt()

    sample = SCHEDULE.ddim_sample(
        oracle, shape, num_steps, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )
    assert seen_t == ddim_timesteps(num_steps)[::-1]

    # With exact eps every step keeps the start noise n; the last step lands on abar_0.
    x_start = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    abar_start = SCHEDULE.alphas_cumprod[seen_t[0]].double()
    noise = (x_start - abar_start.sqrt() * x0) / (1 - abar_start).sqrt()
    torch.testing.assert_close(sample, SCHEDULE.q_sample(x0, torch.tensor([0, 0]), noise), rtol=0, atol=1e-10)
    torch.testing.assert_close(SCHEDULE.predict_x0(sample, torch.tensor([0, 0]), noise), x0, rtol=0, atol=1e-10)


def test_ddim_sample_float32_oracle_stays_close_to_x0():
    shape = (1, 4, 16, 16)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(5))

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = SCHEDULE.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    sample = SCHEDULE.ddim_sample(oracle, shape, 20, generator=torch.Generator().manual_seed(0))
    # The residual noise at abar_0 has std sqrt(beta_0) ~ 0.029, so x0 is within a few of those.
    assert sample.dtype == torch.float32
    assert (sample - x0).abs().max().item() < 6 * math.sqrt(0.00085)
    assert (sample - x0).std().item() == pytest.approx(math.sqrt(1 - alpha_bar(0)), rel=0.15)


def test_ddim_sample_is_reproducible_per_generator_seed():
    def zero_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_t)

    def sample(seed: int) -> torch.Tensor:
        return SCHEDULE.ddim_sample(zero_eps, (1, 4, 4, 4), 10, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_classifier_free_guidance_combines_cond_and_uncond():
    x = torch.zeros(1, 4, 2, 2)
    t = torch.tensor([1])

    def cond(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x_t, 2.0)

    def uncond(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x_t, 0.5)

    # 0.5 + 7.5 * (2.0 - 0.5) = 11.75
    assert torch.equal(classifier_free_guidance(cond, uncond, 7.5)(x, t), torch.full_like(x, 11.75))
    assert torch.equal(classifier_free_guidance(cond, uncond, 1.0)(x, t), cond(x, t))
