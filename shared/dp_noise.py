"""Gaussian noise for the federation's DP, drawn from the operating system's CSPRNG (`os.urandom`).

NumPy's and torch's generators are fast but predictable from their state; noise that an adversary could
reconstruct and subtract protects nothing. Here every normal draw comes from 2 x 53 bits of `os.urandom` through
the Box-Muller transform, in float64, then cast to the array's dtype. (Floating-point Gaussian samplers have known
fine-grained weaknesses, Mironov 2012; they are not addressed here.)
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

NOISE_SOURCE = "os.urandom (Box-Muller, float64)"
"""How the noise is drawn, for DP records."""


def secure_standard_normal(size: int) -> np.ndarray:
    """`size` independent N(0, 1) float64 draws from `os.urandom`."""
    if size <= 0:
        return np.zeros(0, np.float64)
    pairs = (size + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(pairs, 2)
    u = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) / float(2 ** 53)  # in (0, 1]
    radius = np.sqrt(-2.0 * np.log(u[:, 0]))
    angle = 2.0 * np.pi * u[:, 1]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]


def add_secure_gaussian(arrays: Sequence[np.ndarray], stddev: float) -> list[np.ndarray]:
    """Copies of `arrays` with N(0, stddev^2) noise from `os.urandom` added to every element."""
    out = []
    for a in arrays:
        a = np.asarray(a)
        noise = secure_standard_normal(a.size).reshape(a.shape) * float(stddev)
        out.append((a.astype(np.float64) + noise).astype(a.dtype))
    return out
