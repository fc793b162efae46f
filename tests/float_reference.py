"""Tolerances for float32 results, measured on a float64 run of the same computation.

A fixed tolerance ("within 1e-4") on a random-weight network passes or fails with the random
draw and the CPU's kernels: how far rounding carries depends on the weights and on the
summation order. Here the tolerance is measured instead. `reference` is the computation in
float64 (rounding 2**29 times finer than float32's: it stands for the exact result) and
`twin` the same computation in float32, so |twin - reference| is what float32 rounding does
to this quantity, on these weights, on this machine. A float32 result of the same quantity
by another route (merged weights, a batched stack, ComfyUI's patcher, the official code)
may differ from the reference by FACTOR times that.

All arguments are sequences of tensors of equal shapes (residual lists, say), compared
tensor by tensor.
"""
from __future__ import annotations

from typing import Sequence

import torch

EPS32 = torch.finfo(torch.float32).eps

# Rounding errors of two float32 routes to one result are of one size: each is the largest of many
# accumulated roundings. Their ratio varies most for small tensors (a 1 x 1 middle-block residual
# holds 128 values): measured up to 5x over 5 draws of the ComfyUI integration tests, 0.6x-1.6x in
# the core tests. 16x leaves room for other CPUs' summation orders; a wrong or missing term changes
# results by >= 1e-3 of their size, thousands of float32 steps.
FACTOR = 16

# The twin must itself be float32-accurate, or a bug that only affects float32 would widen the bound
# it sets: off by less than float16's precision (2**-10) of the largest value. Float32 rounding stays
# far below that even amplified through a network (measured: <= 2**-14).
TWIN_LIMIT = torch.finfo(torch.float16).eps


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max())


def rounding_allowances(twin: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> list[float]:
    """Per tensor, the largest difference from `reference` that float32 rounding explains: FACTOR x
    the twin's error, and at least FACTOR float32 steps (EPS32) of the tensor's largest value."""
    allowances = []
    for i, (t, r) in enumerate(zip(twin, reference, strict=True)):
        scale, error = float(r.abs().max()), _max_abs_diff(t, r)
        assert error <= TWIN_LIMIT * scale, f"tensor {i}: the float32 twin is {error:.3g} off (values {scale:.3g})"
        allowances.append(FACTOR * max(error, EPS32 * scale))
    return allowances


def assert_float32_close(got: Sequence[torch.Tensor], twin: Sequence[torch.Tensor],
                         reference: Sequence[torch.Tensor]) -> None:
    """`got` (float32, any route) equals `reference` up to what float32 rounding explains."""
    allowances = rounding_allowances(twin, reference)
    for i, (g, r, allowed) in enumerate(zip(got, reference, allowances, strict=True)):
        error = _max_abs_diff(g, r)
        assert error <= allowed, f"tensor {i}: {error:.3g} off, float32 rounding explains {allowed:.3g}"


def assert_float32_apart(a: Sequence[torch.Tensor], twin: Sequence[torch.Tensor],
                         reference: Sequence[torch.Tensor]) -> None:
    """Every tensor of `a` differs from `reference` by more than float32 rounding explains."""
    allowances = rounding_allowances(twin, reference)
    for i, (x, r, allowed) in enumerate(zip(a, reference, allowances, strict=True)):
        difference = _max_abs_diff(x, r)
        assert difference > allowed, f"tensor {i}: only {difference:.3g} apart, within rounding ({allowed:.3g})"
