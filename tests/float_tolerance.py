"""Tolerances for values pinned from float32 computations, derived from the computation.

A pinned number that went through float32 matrix products depends on the summation order, which
the CPU, its BLAS kernels and the thread count choose: the same code gives values a few 1e-6
apart on two machines (issue 18). A pin must allow that spread and no more, so that it still
catches a real change of a formula or of its inputs.

The bound: a float32 dot product of n terms has a relative rounding error of about sqrt(n) * u
(u = 2**-24, rounding errors of random sign), and errors compound about linearly through the
layers a statistic passes: forward statistics pass `depth` layers once, gradient statistics pass
them twice (forward, then backward). Pinned quantities computed from weights alone do not depend
on the summation order of any pass and get a fixed 1e-6 for the float64 sums of float32 weights.

Measured on SmolLM2 (depth 30, width 1536) with 1 and 2 threads, ATen's default and AVX2 kernels
and MKL's compatible code path: forward statistics moved by at most 3.6e-7 relative and gradient
statistics by at most 9.1e-6, against bounds of 7.0e-5 and 1.4e-4 from `float32_rel_tolerance`.
Any change of a proxy's formula or inputs moves them by far more (tests/integration/
test_proxy_pins_smollm2.py shows it).
"""

from __future__ import annotations

import math

UNIT_ROUNDOFF = 2.0**-24  # float32
WEIGHTS_ONLY = 1e-6


def float32_rel_tolerance(depth: int, width: int, passes: int = 1) -> float:
    """Relative tolerance for a statistic computed through `depth` layers of float32 sums over
    `width` terms, `passes` times (1: forward, 2: forward and backward)."""
    return passes * depth * math.sqrt(width) * UNIT_ROUNDOFF


# How each pinned proxy reaches its value: the passes over the model its statistics need.
PROXY_PASSES = {
    "fisher": 2,  # squared output gradients: forward and backward
    "attn_out": 1,  # attention inputs: forward
    "act_cos": 1,
    "kv_recon": 1,
    "local_attn": 1,
    "wse": 0,  # weights only
}


def proxy_rel_tolerance(name: str, depth: int, width: int) -> float:
    """The pin tolerance of proxy `name` on a model of this depth and width (never below the
    float64 sums' WEIGHTS_ONLY)."""
    return max(WEIGHTS_ONLY, float32_rel_tolerance(depth, width, PROXY_PASSES[name]))
