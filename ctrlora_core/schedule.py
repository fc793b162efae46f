"""The SD1.5 diffusion schedule (epsilon prediction) and a deterministic DDIM sampler.

Forward process, with abar_t = alphas_cumprod[t], t in [0, 1000):

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise,   noise ~ N(0, I)

The network predicts the noise ("eps"), so the training target is the noise itself
and the loss is MSE(eps_pred, noise). Betas are SD's "linear" schedule, which is
linear in sqrt space: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2.

DDIM with eta = 0 follows the official sampler (`ddim_hacked.py`, "uniform"
discretisation): timesteps 1, 1 + c, 1 + 2c, ... with c = 1000 // num_steps, run
from the largest down; the last step lands on abar_0 (not on 1), as in the
official code and diffusers' `set_alpha_to_one=False`.
"""
from __future__ import annotations

from typing import Callable

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""eps_fn(x_t, t) -> predicted noise, with t an int64 tensor [B]."""


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """DDIM timesteps in increasing order: range(0, T, T // num_steps) shifted by +1.

    Like the official code, this gives more than `num_steps` steps when
    num_steps does not divide T (30 -> 31 steps). num_steps must be in [1, T // 2]
    so that the largest step stays below T.
    """
    if not 1 <= num_steps <= num_train_timesteps // 2:
        raise ValueError(f"num_steps: expected 1..{num_train_timesteps // 2}, got {num_steps}")
    return [step + 1 for step in range(0, num_train_timesteps, num_train_timesteps // num_steps)]


def classifier_free_guidance(cond_fn: EpsFn, uncond_fn: EpsFn, scale: float) -> EpsFn:
    """eps = uncond + scale * (cond - uncond), as in the official sampler (CFG 7.5 there)."""

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond = uncond_fn(x_t, t)
        return uncond + scale * (cond_fn(x_t, t) - uncond)

    return guided


class NoiseSchedule:
    """SD1.5 noise schedule: `betas` and `alphas_cumprod`, float32 tensors [T] on the CPU."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        self.betas = betas.float()
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise x0 to timesteps t (int64 [B]): sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise."""
        signal, sigma = self._coefficients(t, x0)
        return signal * x0 + sigma * noise

    @staticmethod
    def eps_target(noise: torch.Tensor) -> torch.Tensor:
        """Training target for epsilon prediction: the noise passed to q_sample, unchanged."""
        return noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert q_sample given the noise: (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)."""
        signal, sigma = self._coefficients(t, x_t)
        return (x_t - sigma * eps) / signal

    def ddim_step(self, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """One deterministic DDIM step (eta 0) from timestep t to t_prev < t.

        x_prev = sqrt(abar_prev) * x0_pred + sqrt(1 - abar_prev) * eps.
        """
        if not 0 <= t_prev < t:
            raise ValueError(f"ddim_step: expected 0 <= t_prev < t, got t={t}, t_prev={t_prev}")
        batch = torch.full((x_t.shape[0],), t, dtype=torch.int64, device=x_t.device)
        x0_pred = self.predict_x0(x_t, batch, eps)
        abar_prev = self.alphas_cumprod[t_prev].item()
        return abar_prev**0.5 * x0_pred + (1 - abar_prev) ** 0.5 * eps

    @torch.no_grad()
    def ddim_sample(
        self,
        eps_fn: EpsFn,
        shape: tuple[int, ...],
        num_steps: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Sample a latent of `shape` from N(0, I) noise with DDIM (eta 0).

        `generator` (on `device`) makes the start noise reproducible. Wrap eps_fn
        with classifier_free_guidance for CFG.
        """
        x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        steps = ddim_timesteps(num_steps, self.num_timesteps)
        previous = [0] + steps[:-1]
        for t, t_prev in zip(reversed(steps), reversed(previous)):
            t_batch = torch.full((shape[0],), t, dtype=torch.int64, device=device)
            x = self.ddim_step(x, eps_fn(x, t_batch), t, t_prev)
        return x

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t), computed in float64, shaped [B, 1, ...] and typed like `like`."""
        if t.dtype != torch.int64 or t.shape != (like.shape[0],):
            raise ValueError(
                f"t: expected an int64 tensor of shape [{like.shape[0]}], "
                f"got {t.dtype} of shape {list(t.shape)}"
            )
        if bool(((t < 0) | (t >= self.num_timesteps)).any()):
            raise ValueError(f"t: expected timesteps in [0, {self.num_timesteps}), got {t.tolist()}")
        # float64 on the CPU, then moved: some devices (MPS) have no float64.
        abar = self.alphas_cumprod.double()[t.cpu()].reshape(-1, *([1] * (like.ndim - 1)))
        return abar.sqrt().to(like.device, like.dtype), (1 - abar).sqrt().to(like.device, like.dtype)
