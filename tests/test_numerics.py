"""Quantization math and MatMulNBits packing against independent references:
a per-element loop and ONNX Runtime's own C++ blockwise quantizer (byte-identical packing)."""

from __future__ import annotations

import numpy as np
import pytest
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

from ptqonnx.numerics.packing import pack_bits, pack_matmulnbits_weight, pack_zero_points, unpack_bits
from ptqonnx.numerics.quant import dequantize_weight, quantize_weight

SHAPES = [(64, 8, 16), (100, 8, 32), (128, 16, 128), (576, 24, 128), (200, 5, 64), (96, 3, 256)]


def _reference_rtn(w_nk: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """Per-block, per-element loop of the same grid (independent of the vectorized code)."""
    out = np.zeros_like(w_nk)
    qmax, mid = 2**bits - 1, 2 ** (bits - 1)
    for n in range(w_nk.shape[0]):
        for b0 in range(0, w_nk.shape[1], block):
            blk = w_nk[n, b0 : b0 + block].astype(np.float64)
            if symmetric:
                m = blk.max() if abs(blk.max()) > abs(blk.min()) else blk.min()
                s, z = np.float32(m / -mid), mid
            else:
                lo, hi = min(blk.min(), 0.0), max(blk.max(), 0.0)
                s = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(qmax))
                z = 0 if s == 0 else int(min(max(np.floor(-np.float32(lo) / s + 0.5), 0), qmax))
            for i, v in enumerate(blk):
                r = np.float32(z) if s == 0 else np.float32(v) * (np.float32(1) / s) + np.float32(z)
                q = min(max(np.sign(r) * np.floor(abs(r) + 0.5), 0), qmax)
                out[n, b0 + i] = (q - z) * s
    return out


@pytest.mark.parametrize("k,n,block", SHAPES[:4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_matches_loop_reference(k, n, block, symmetric):
    w = np.random.default_rng(k + n).standard_normal((n, k)).astype(np.float32)
    got = dequantize_weight(quantize_weight(w, 4, block, symmetric))
    np.testing.assert_allclose(got, _reference_rtn(w, 4, block, symmetric), rtol=0, atol=1e-6)


@pytest.mark.parametrize("k,n,block", SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_byte_identical_to_onnxruntime(k, n, block, symmetric, bits):
    w_kn = np.random.default_rng(7).standard_normal((k, n)).astype(np.float32)
    kb = (k + block - 1) // block
    per = 8 // bits
    ref_b = np.zeros((n, kb, block * bits // 8), np.uint8)
    ref_s = np.zeros((n, kb), np.float32)
    ref_z = np.zeros((n, (kb + per - 1) // per), np.uint8)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(ref_b, np.pad(w_kn, ((0, kb * block - k), (0, 0))), ref_s, ref_z, block, n, k, symmetric)

    qw = quantize_weight(w_kn.T, bits, block, symmetric)
    np.testing.assert_array_equal(pack_matmulnbits_weight(qw.q, bits, block), ref_b)
    np.testing.assert_array_equal(qw.scale, ref_s)
    if not symmetric:
        np.testing.assert_array_equal(pack_zero_points(qw.zero_point, bits), ref_z)


@pytest.mark.parametrize("symmetric", [True, False])
def test_ties_round_like_onnxruntime(symmetric):
    """Weights on an exact grid produce w/s = k + 0.5 ties; MLAS rounds w/s + z, so ties go up."""
    w_kn = np.array([-8, -4.5, -3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 1, 2, 7],
                    np.float32).reshape(16, 1)
    ref_b = np.zeros((1, 1, 8), np.uint8)
    ref_s = np.zeros((1, 1), np.float32)
    ref_z = np.zeros((1, 1), np.uint8)
    quantize_matmul_4bits(ref_b, w_kn, ref_s, ref_z, 16, 1, 16, symmetric)
    qw = quantize_weight(w_kn.T, 4, 16, symmetric)
    np.testing.assert_array_equal(pack_matmulnbits_weight(qw.q, 4, 16), ref_b)


def test_zero_block_dequantizes_to_zero():
    w = np.zeros((2, 32), np.float32)
    w[1, 16:] = 1.5
    for sym in (True, False):
        qw = quantize_weight(w, 4, 16, sym)
        np.testing.assert_array_equal(dequantize_weight(qw)[0], 0)
        assert np.abs(dequantize_weight(qw)[1, 16:] - 1.5).max() < 0.2


def test_per_channel_is_one_block_per_row():
    w = np.random.default_rng(1).standard_normal((6, 50)).astype(np.float32)
    qw = quantize_weight(w, 8, None, True)
    assert qw.block_size == 50 and qw.scale.shape == (6, 1)
    np.testing.assert_allclose(dequantize_weight(qw), _reference_rtn(w, 8, 50, True), atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = np.random.default_rng(0).integers(0, 2**bits, size=(3, 5, 16), dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (3, 5, 16 * bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits), codes)


def test_low_nibble_first():
    assert pack_bits(np.array([1, 2], np.uint8), 4).tolist() == [0x21]


@pytest.mark.parametrize("bad", [dict(bits=5), dict(block_size=0)])
def test_quantize_rejects_bad_arguments(bad):
    args = dict(bits=4, block_size=16) | bad
    with pytest.raises(ValueError):
        quantize_weight(np.ones((2, 16), np.float32), args["bits"], args["block_size"], True)


# -- the positive symmetric grid (TensorRT: scales must be positive) ----------------------------------------

@pytest.mark.parametrize("bits,block", [(8, None), (4, 32), (4, 128), (3, 128)])
def test_positive_grid_holds_every_block_with_the_smallest_positive_scale(bits, block):
    """s = max(-min/2^(b-1), max/(2^(b-1)-1)) >= 0: every weight within half a step of its value (no clipping),
    an end of the range exactly on its grid end, and rows whose signed extreme is negative (and whose max stays
    inside the grid ORT's signed scale gives them) on the same grid as ORT's signed one."""
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    w[::3] -= 0.5  # rows with a negative extreme
    w[1::3] += 0.5  # and with a positive one
    qw = quantize_weight(w, bits, block, True, positive=True)
    mid = 1 << (bits - 1)
    assert (qw.scale >= 0).all() and (qw.zero_point == mid).all()
    bs = qw.block_size
    blocks = w.reshape(64, -1, bs)
    lo, hi = blocks.min(-1), blocks.max(-1)
    np.testing.assert_allclose(qw.scale, np.maximum(-lo / mid, hi / (mid - 1)), rtol=1e-6)
    err = np.abs(dequantize_weight(qw) - w).reshape(64, -1, bs)
    assert (err <= qw.scale[..., None] * 0.5 * (1 + 1e-5) + 1e-7).all()
    signed = quantize_weight(w, bits, block, True)
    same = (np.abs(lo) >= np.abs(hi)) & (hi <= (mid - 1) * signed.scale)
    assert same.any() and (signed.scale < 0).any()  # and rows where ORT's scale is negative
    np.testing.assert_array_equal(qw.scale[same], signed.scale[same])  # ORT's: s = lo / -mid
    np.testing.assert_array_equal(qw.q.reshape(64, -1, bs)[same], signed.q.reshape(64, -1, bs)[same])


def test_gptq_keeps_the_positive_grid():
    """GPTQ chooses its grids with the same rule (`positive=True`): positive scales, codes in range, and its
    output error no worse than RTN's on the same grid."""
    from ptqonnx.numerics.gptq import gptq_quantize

    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 64)) * np.linspace(0.2, 3.0, 64)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    h = 2 * x.T @ x / len(x)
    res = gptq_quantize(w, h, bits=8, block_size=None, symmetric=True, positive=True)
    assert (res.qweight.scale >= 0).all()
    rtn = quantize_weight(w, 8, None, True, positive=True)
    err = lambda q: float(np.sum((x @ (dequantize_weight(q) - w).T) ** 2))  # noqa: E731
    assert err(res.qweight) <= err(rtn)
