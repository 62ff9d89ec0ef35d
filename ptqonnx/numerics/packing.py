"""Bit packing for ONNX Runtime's `com.microsoft::MatMulNBits` (docs/ContribOperators.md).

* B: uint8 [N, k_blocks, blob_size], blob_size = block_size * bits / 8. Row n of W [N, K] (N-major),
  split into blocks of `block_size` along K (the last block zero-padded); inside a byte the earlier
  element takes the low bits ("for 4 bits, the first 4 bits are stored in the lower 4 bits of a byte").
* scales: [N, k_blocks] in the activation's float type.
* zero_points (optional; omitted means 2^(bits-1), e.g. 8 for INT4): uint8 [N, ceil(k_blocks * bits / 8)],
  packed the same way along k_blocks and padded per row
  with 2^(bits-1).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "pack_bits", "unpack_bits", "pack_matmulnbits_weight", "pack_zero_points", "blob_size", "storage_bits",
]


def storage_bits(bits: int) -> int:
    """Bits per stored code: 3-bit codes (0..7) go in 4-bit containers (neither MatMulNBits nor ONNX has a
    3-bit packing), so a W3 grid costs the size of W4 but keeps W3's accuracy."""
    return 4 if bits == 3 else bits


def _check_bits(bits: int) -> None:
    if bits not in (2, 4, 8):
        raise ValueError(f"packing supports 2, 4 or 8 bits, got {bits}")


def blob_size(block_size: int, bits: int) -> int:
    return block_size * bits // 8


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes [..., L] (L a multiple of 8 // bits) into uint8 [..., L * bits / 8], low first."""
    _check_bits(bits)
    per = 8 // bits
    c = np.asarray(codes, dtype=np.uint8)
    if c.shape[-1] % per:
        raise ValueError(f"last axis {c.shape[-1]} is not a multiple of {per}")
    c = c.reshape(*c.shape[:-1], c.shape[-1] // per, per)
    out = np.zeros(c.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= (c[..., i] & ((1 << bits) - 1)) << (i * bits)
    return out


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_bits: uint8 [..., M] -> codes [..., M * 8 / bits]."""
    _check_bits(bits)
    per = 8 // bits
    p = np.asarray(packed, dtype=np.uint8)
    parts = [(p >> (i * bits)) & ((1 << bits) - 1) for i in range(per)]
    return np.stack(parts, axis=-1).reshape(*p.shape[:-1], p.shape[-1] * per)


def pack_matmulnbits_weight(q: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Codes q [N, K] -> B uint8 [N, k_blocks, blob_size]; padding past K is 0 (never read), as ORT writes it."""
    n, k = q.shape
    kb = (k + block_size - 1) // block_size
    padded = np.zeros((n, kb * block_size), dtype=np.uint8)
    padded[:, :k] = q
    return pack_bits(padded.reshape(n, kb, block_size), bits)  # [N, k_blocks, blob_size]


def pack_zero_points(zero_point: np.ndarray, bits: int) -> np.ndarray:
    """Zero points [N, k_blocks] -> uint8 [N, ceil(k_blocks * bits / 8)] (each row padded)."""
    per = 8 // bits
    n, kb = zero_point.shape
    # unused slots hold 2^(bits-1), as ONNX Runtime's own quantizer writes them (byte-identical output)
    padded = np.full((n, ((kb + per - 1) // per) * per), 1 << (bits - 1), dtype=np.uint8)
    padded[:, :kb] = zero_point
    return pack_bits(padded, bits)
