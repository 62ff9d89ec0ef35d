"""Rotation numerics: Hadamard constructions exact in integers, orthonormal to float64 eps, seeded randomness,
Kronecker factors, and the statistics transform against statistics of the rotated activation itself."""

from __future__ import annotations

import numpy as np
import pytest

from ptqonnx.numerics.rotation import (
    apply_kronecker, block_diagonal, channel_mean_square, hadamard, hadamard_unnormalized, has_hadamard,
    is_orthogonal, kronecker_factors, random_hadamard, random_orthogonal, rotate_gram, rotate_rows,
    rotation_matrix,
)

EPS = np.finfo(np.float64).eps
# Sylvester, Paley I (12, 20, 24, 44), Paley II (28, 36), Kronecker (72, 576, 768, 1536) and SmolLM2's sizes
SIZES = [1, 2, 4, 8, 12, 20, 24, 28, 36, 44, 64, 72, 576, 768, 1536]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_is_exact_and_orthonormal(n: int) -> None:
    h = hadamard_unnormalized(n)
    assert h.dtype == np.int64 and set(np.unique(h).tolist()) <= {-1, 1}
    hf = h.astype(np.float64)  # sums of ±1 are exact integers in float64: H Hᵀ = n I exactly
    assert np.array_equal(hf @ hf.T, n * np.eye(n))
    q = hadamard(n)
    assert np.abs(q.T @ q - np.eye(n)).max() <= 8 * n * EPS
    assert np.allclose(np.abs(q), 1 / np.sqrt(n), rtol=0, atol=EPS)


def test_paley_types_give_their_orders() -> None:
    # 12 = 11 + 1 and 20 = 19 + 1 (q ≡ 3 mod 4: type I), 28 = 2(13 + 1) and 36 = 2(17 + 1) (q ≡ 1 mod 4: type II)
    for n in (12, 20, 28, 36):
        a, b = kronecker_factors(n)
        assert (a.shape, b.shape) == ((n, n), (1, 1)), n


@pytest.mark.parametrize("n, a, b", [(576, 36, 16), (1536, 12, 128), (64, 8, 8), (128, 8, 16), (12, 12, 1)])
def test_kronecker_factors(n: int, a: int, b: int) -> None:
    fa, fb = kronecker_factors(n)
    assert fa.shape == (a, a) and fb.shape == (b, b)
    assert is_orthogonal(fa, 1e-13) and is_orthogonal(fb, 1e-13)
    assert np.abs(np.kron(fa, fb) - hadamard(n)).max() <= 4 * EPS
    x = np.random.default_rng(0).standard_normal((3, 5, n))
    assert np.abs(apply_kronecker(x, (fa, fb)) - x @ hadamard(n)).max() <= 1e-12 * np.sqrt(n)


@pytest.mark.parametrize("n", [0, 3, 52, 92])  # 92 exists (Williamson), not by these constructions
def test_unknown_sizes_raise_naming_n(n: int) -> None:
    assert not has_hadamard(n)
    with pytest.raises(ValueError, match=f"n={n}"):
        hadamard(n)
    with pytest.raises(ValueError, match=f"n={n}"):
        kronecker_factors(n)


def test_hadamard_spreads_an_outlier_channel() -> None:
    x = np.zeros(576)
    x[123] = 1000.0
    y = x @ hadamard(576)
    assert np.allclose(np.abs(y), 1000.0 / 24.0) and np.isclose(np.linalg.norm(y), 1000.0)


def test_random_hadamard_is_seeded_signed_hadamard() -> None:
    q0, q0b, q1 = random_hadamard(64, 0), random_hadamard(64, 0), random_hadamard(64, 1)
    assert np.array_equal(q0, q0b) and not np.array_equal(q0, q1)
    signs = q0[0] / hadamard(64)[0]  # H diag(d): column j scaled by d_j
    assert set(np.unique(signs).round(12).tolist()) == {-1.0, 1.0}
    assert np.array_equal(q0, hadamard(64) * signs[None, :])
    assert np.abs(q0.T @ q0 - np.eye(64)).max() <= 8 * 64 * EPS


def test_random_orthogonal_is_seeded_and_orthogonal() -> None:
    q0, q0b, q1 = random_orthogonal(96, 3), random_orthogonal(96, 3), random_orthogonal(96, 4)
    assert np.array_equal(q0, q0b) and not np.allclose(q0, q1)
    assert np.abs(q0.T @ q0 - np.eye(96)).max() <= 200 * EPS
    assert np.abs(q0 @ q0.T - np.eye(96)).max() <= 200 * EPS


def test_rotation_matrix_kinds() -> None:
    assert np.array_equal(rotation_matrix(12, "hadamard"), hadamard(12))
    assert np.array_equal(rotation_matrix(12, "random_hadamard", 5), random_hadamard(12, 5))
    assert np.array_equal(rotation_matrix(12, "random_orthogonal", 5), random_orthogonal(12, 5))
    with pytest.raises(ValueError, match="unknown rotation kind 'givens'"):
        rotation_matrix(12, "givens")


def test_block_diagonal_rotates_each_block_alone() -> None:
    r = random_hadamard(16, 2)
    b = block_diagonal(r, 3)
    assert b.shape == (48, 48) and is_orthogonal(b, 1e-13)
    x = np.random.default_rng(1).standard_normal((7, 48))
    assert np.allclose(x @ b, (x.reshape(7, 3, 16) @ r).reshape(7, 48), atol=1e-13)


def test_statistics_transform_matches_the_rotated_activation() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 36)) * np.exp(rng.uniform(-2, 3, 36))  # a few large channels
    q = random_hadamard(36, 7)
    xr = x @ q
    assert np.allclose(rotate_gram(x.T @ x, q), xr.T @ xr, rtol=1e-12, atol=1e-9)
    assert np.allclose(channel_mean_square(rotate_gram(x.T @ x, q), 200), (xr**2).mean(axis=0), rtol=1e-12)
    sample = x[:10].astype(np.float32)
    assert rotate_rows(sample, q).dtype == np.float32
    assert np.allclose(rotate_rows(sample, q), sample.astype(np.float64) @ q, rtol=1e-6, atol=1e-5)
    # the point of the rotation: per-channel mean squares become flat
    ms, ms_rot = (x**2).mean(0), (xr**2).mean(0)
    assert ms.max() / np.median(ms) > 10 * ms_rot.max() / np.median(ms_rot)
