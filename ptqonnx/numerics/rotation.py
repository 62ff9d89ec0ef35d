"""Orthogonal rotations for QuaRot / SpinQuant: Hadamard constructions, random rotations, statistics transforms.

A rotation Q [n, n] with QᵀQ = I leaves a linear layer unchanged when it is folded into both sides,
y = x W = (x Q)(Qᵀ W), and spreads a few large channels of x over all of them: an outlier of size a in one
channel becomes entries of size a/√n in every channel of x Q when Q is a (normalized) Hadamard matrix, whose
entries are all ±1/√n (QuaRot, Ashkboos et al. 2024, sec. 3; SpinQuant, Liu et al. 2024, sec. 3).

Hadamard matrices (H Hᵀ = n I, entries ±1) built here, returned normalized (H/√n, orthonormal):

* Sylvester, n = 2^k: H_1 = [1], H_2m = [[H_m, H_m], [H_m, -H_m]].
* Paley I, n = q + 1 with q ≡ 3 (mod 4) prime: with the Jacobsthal matrix J[i, j] = χ(j - i) (χ the
  quadratic character mod q, χ(0) = 0; J is antisymmetric, J Jᵀ = q I - 𝟙𝟙ᵀ and J 𝟙 = 0),
  S = [[0, 𝟙ᵀ], [-𝟙, J]] and H = I + S (S antisymmetric with S Sᵀ = q I, so H Hᵀ = I + S Sᵀ = (q + 1) I).
  Orders 4, 8, 12, 20, 24, ...
* Paley II, n = 2(q + 1) with q ≡ 1 (mod 4) prime: J is symmetric, C = [[0, 𝟙ᵀ], [𝟙, J]] is a symmetric
  conference matrix (C Cᵀ = q I), and H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]. Orders 12, 28, 36, ...
* Kronecker products: H_a ⊗ H_b is a Hadamard matrix of order a·b, so n = m · 2^k with m a Paley order;
  the smallest such m is chosen (576 = 36 · 16, 1536 = 12 · 128; 64 is Sylvester).

Only prime q are used (prime powers need finite-field arithmetic); `hadamard(n)` raises ValueError naming n
when no construction above gives n.

Random rotations: `random_hadamard(n, seed)` = H diag(d), d uniform ±1 (QuaRot's randomized Hadamard);
`random_orthogonal(n, seed)` = Q of the QR decomposition of a Gaussian matrix with the signs of R's diagonal
moved into Q (Haar distributed; SpinQuant's random initialization).

Online transforms: x ↦ x (A ⊗ B) for x viewed as [..., a, b] (row-major, index i = i_a·b + i_b) is
Aᵀ X B per row, two small matrix products instead of one (a·b)² product (`kronecker_factors`,
`apply_kronecker`); a block-diagonal blockdiag(B, ..., B) rotates each consecutive block of b channels alone.

Statistics: for x' = x Q, X'ᵀX' = Qᵀ (XᵀX) Q exactly, so Hessians (GPTQ) and per-channel mean squares
diag(X'ᵀX')/n carry over; sampled rows rotate exactly (x' = x Q); per-channel |x| maxima and means do not
(a maximum of a rotated row is not a function of the old per-channel maxima) and must be re-measured.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = [
    "hadamard",
    "hadamard_unnormalized",
    "has_hadamard",
    "kronecker_factors",
    "apply_kronecker",
    "block_diagonal",
    "random_hadamard",
    "random_orthogonal",
    "rotation_matrix",
    "is_orthogonal",
    "rotate_gram",
    "rotate_rows",
    "channel_mean_square",
    "ROTATION_KINDS",
]

ROTATION_KINDS = ("hadamard", "random_hadamard", "random_orthogonal")


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % p for p in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """J[i, j] = χ(j - i) for the quadratic character χ mod a prime q (χ(0) = 0)."""
    squares = np.zeros(q, dtype=bool)
    squares[(np.arange(1, q) ** 2) % q] = True
    chi = np.where(squares, 1, -1).astype(np.int64)
    chi[0] = 0
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q  # j - i
    return chi[idx]


def _paley1(q: int) -> np.ndarray:
    """Order q + 1, q ≡ 3 (mod 4) prime: H = I + [[0, 𝟙ᵀ], [-𝟙, J]]."""
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1), q ≡ 1 (mod 4) prime: C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]."""
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(q + 1, dtype=np.int64),
                                                             np.array([[1, -1], [-1, -1]]))


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _paley(m: int) -> np.ndarray | None:
    """A Paley construction of order m (I preferred), or None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


def _split(n: int) -> tuple[int, int] | None:
    """n = m · 2^k with m = 1 or the smallest Paley order: (m, 2^k), or None."""
    if n < 1:
        return None
    if n & (n - 1) == 0:
        return 1, n
    p = 1
    candidates = []
    while n % p == 0:
        m = n // p
        if m > 2 and _paley(m) is not None:
            candidates.append((m, p))
        p *= 2
    return min(candidates) if candidates else None


@lru_cache(maxsize=64)
def _hadamard_int(n: int) -> np.ndarray:
    split = _split(n)
    if split is None:
        raise ValueError(f"no Hadamard construction known for n={n} (supported: 2^k, and m·2^k with m = q+1 for a "
                         "prime q ≡ 3 mod 4 or m = 2(q+1) for a prime q ≡ 1 mod 4)")
    m, p = split
    h = _sylvester(p)
    if m > 1:
        h = np.kron(_paley(m), h)
    h.setflags(write=False)
    return h


def has_hadamard(n: int) -> bool:
    """Whether `hadamard(n)` has a construction."""
    return _split(n) is not None


def hadamard_unnormalized(n: int) -> np.ndarray:
    """A Hadamard matrix of order n: int64 entries ±1, H Hᵀ = n I (ValueError naming n when unknown)."""
    return _hadamard_int(n).copy()


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Hadamard matrix H/√n [n, n] float64 (ValueError naming n when no construction is known)."""
    return _hadamard_int(n) / np.sqrt(n)


def kronecker_factors(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal (A, B) with A ⊗ B = `hadamard(n)` (up to rounding): A the Paley factor and B the Sylvester
    one, or for n = 2^k two Sylvester factors of orders 2^⌊k/2⌋ and 2^⌈k/2⌉ (Sylvester's H_2^k is the k-th
    Kronecker power of H_2). ValueError naming n when no construction is known."""
    split = _split(n)
    if split is None:
        hadamard(n)  # raises naming n
    m, p = split
    if m == 1:
        m = 1 << (p.bit_length() - 1) // 2
        p //= m
        return _sylvester(m) / np.sqrt(m), _sylvester(p) / np.sqrt(p)
    return _paley(m) / np.sqrt(m), _sylvester(p) / np.sqrt(p)


def apply_kronecker(x: np.ndarray, factors: tuple[np.ndarray, ...]) -> np.ndarray:
    """x (F_1 ⊗ F_2 ⊗ ...) along the last axis, one small product per factor (x [..., n], n = Π sizes)."""
    sizes = [f.shape[0] for f in factors]
    lead = x.shape[:-1]
    y = x.reshape(*lead, *sizes)
    for axis, f in enumerate(factors):
        ax = len(lead) + axis
        y = np.moveaxis(np.tensordot(y, f, axes=([ax], [0])), -1, ax)  # contract i_axis with F[i_axis, j]
    return y.reshape(*lead, -1)


def block_diagonal(block: np.ndarray, count: int) -> np.ndarray:
    """blockdiag(block, ..., block) with `count` copies ([count·b, count·b])."""
    return np.kron(np.eye(count), block)


def random_hadamard(n: int, seed: int) -> np.ndarray:
    """H diag(d) with d uniform ±1 from `seed` (QuaRot): orthonormal, deterministic by seed."""
    d = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=n)
    return hadamard(n) * d[None, :]


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal matrix from `seed`: Q R = G Gaussian, Q's columns multiplied by sign(diag R)."""
    g = np.random.default_rng(seed).standard_normal((n, n))
    q, r = np.linalg.qr(g)
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    return q * signs[None, :]


def rotation_matrix(n: int, kind: str, seed: int = 0) -> np.ndarray:
    """The rotation of size n of `kind` (one of ROTATION_KINDS); ValueError on an unknown kind."""
    if kind == "hadamard":
        return hadamard(n)
    if kind == "random_hadamard":
        return random_hadamard(n, seed)
    if kind == "random_orthogonal":
        return random_orthogonal(n, seed)
    raise ValueError(f"unknown rotation kind {kind!r}; use one of {list(ROTATION_KINDS)}")


def is_orthogonal(q: np.ndarray, tol: float = 1e-10) -> bool:
    """Whether q is square with max |qᵀq - I| <= tol."""
    q = np.asarray(q, dtype=np.float64)
    return q.ndim == 2 and q.shape[0] == q.shape[1] and float(np.abs(q.T @ q - np.eye(q.shape[0])).max()) <= tol


def rotate_gram(xtx: np.ndarray, q: np.ndarray) -> np.ndarray:
    """XᵀX of x' = x Q: Qᵀ (XᵀX) Q, float64 [n, n]."""
    q = np.asarray(q, dtype=np.float64)
    return q.T @ np.asarray(xtx, dtype=np.float64) @ q


def rotate_rows(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Rows (e.g. a calibration sample) of x' = x Q, in x's dtype."""
    return (np.asarray(x, dtype=np.float64) @ np.asarray(q, dtype=np.float64)).astype(np.asarray(x).dtype)


def channel_mean_square(xtx: np.ndarray, count: int) -> np.ndarray:
    """Per-channel mean of x² over `count` rows from XᵀX: diag(XᵀX) / count (exact for rotated XᵀX too)."""
    return np.diag(np.asarray(xtx, dtype=np.float64)) / max(int(count), 1)
