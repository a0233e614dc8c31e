"""decode_gemm's Triton kernels (interpret mode) against their float32 references."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_gemm

EPS = 1e-6
# Tolerance as a fraction of the output's largest magnitude: float32 runs the same math in
# another order; bfloat16 rounds x * norm_weight and the output to 8 bits.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(rows, k, n, dtype, seed=0):
  rng = np.random.default_rng(seed)
  # Rows of very different scales: the norm must be per row.
  x = rng.standard_normal((rows, k)) * np.geomspace(0.1, 30.0, rows)[:, None]
  norm_weight = 1.0 + 0.5 * rng.standard_normal(k)
  w = rng.standard_normal((k, n)) / np.sqrt(k)
  bias = rng.standard_normal(n)
  residual = 4.0 * rng.standard_normal((rows, n))
  return tuple(jnp.asarray(a, dtype) for a in (x, norm_weight, w, bias, residual))


def _assert_close(got, want, dtype):
  assert got.shape == want.shape and got.dtype == want.dtype
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.max(np.abs(want))
  np.testing.assert_allclose(got, want, atol=TOLERANCE[dtype] * scale, rtol=0)


# Rows: not a power of two (24, 96: masked padding rows), exactly one tile (32). K and N not
# multiples of the tiles (masked last K tile, masked last N tile); one K split (the epilogue in
# the kernel), several (float32 partials summed by XLA), a split count that leaves a split
# shorter than the others (96 features in 32-wide tiles over 2 splits), and the defaults.
@pytest.mark.parametrize("rows,k,n,dtype,with_bias,tuning", [
    (24, 96, 80, jnp.float32, True, dict(block_n=32, block_k=32, split_k=1)),
    (96, 96, 80, jnp.bfloat16, False, dict(block_n=32, block_k=32, split_k=2)),
    (32, 96, 80, jnp.bfloat16, True, dict(block_n=16, block_k=32, split_k=3)),
    (24, 64, 48, jnp.float32, False, {}),
])
def test_norm_matmul_matches_reference(rows, k, n, dtype, with_bias, tuning):
  x, norm_weight, w, bias, _ = _inputs(rows, k, n, dtype)
  bias = bias if with_bias else None
  got = decode_gemm.norm_matmul(x, norm_weight, w, bias, eps=EPS, impl="interpret", **tuning)
  want = decode_gemm.norm_matmul_reference(x, norm_weight, w, bias, eps=EPS)
  _assert_close(got, want, dtype)


@pytest.mark.parametrize("rows,k,n,dtype,tuning", [
    (24, 96, 80, jnp.bfloat16, dict(block_n=32, block_k=32, split_k=1)),
    (96, 96, 80, jnp.float32, dict(block_n=32, block_k=32, split_k=2)),
])
def test_matmul_residual_matches_reference(rows, k, n, dtype, tuning):
  x, _, w, _, residual = _inputs(rows, k, n, dtype, seed=1)
  got = decode_gemm.matmul_residual(x, w, residual, impl="interpret", **tuning)
  want = decode_gemm.matmul_residual_reference(x, w, residual)
  _assert_close(got, want, dtype)


def test_reference_is_the_model_definition():
  """The reference against numpy float64: RMSNorm per row, scale, matmul, bias."""
  x, norm_weight, w, bias, residual = _inputs(5, 24, 8, jnp.float32)
  x64, g, w64 = (np.asarray(a, np.float64) for a in (x, norm_weight, w))
  normed = x64 / np.sqrt(np.mean(x64**2, axis=1, keepdims=True) + EPS) * g
  np.testing.assert_allclose(
      decode_gemm.norm_matmul_reference(x, norm_weight, w, bias, eps=EPS),
      normed @ w64 + np.asarray(bias), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(decode_gemm.matmul_residual_reference(x, w, residual),
                             np.asarray(residual) + x64 @ w64, rtol=1e-5, atol=1e-5)


def test_plain_jax_settings_run_the_reference():
  x, norm_weight, w, bias, residual = _inputs(8, 24, 8, jnp.bfloat16)
  want = decode_gemm.norm_matmul_reference(x, norm_weight, w, bias, eps=EPS)
  for impl in ("reference", "xla", "auto"):  # "auto" on this CPU resolves to "xla"
    np.testing.assert_array_equal(
        decode_gemm.norm_matmul(x, norm_weight, w, bias, eps=EPS, impl=impl), want)
  np.testing.assert_array_equal(decode_gemm.matmul_residual(x, w, residual, impl="reference"),
                                decode_gemm.matmul_residual_reference(x, w, residual))


def test_tuning_fills_the_gpu_and_keeps_every_split_nonempty():
  # 1.5B q/k/v at one block: 32 N tiles of 64, split 4 ways over 12 K tiles -> 128 programs.
  t = decode_gemm.kernel_tuning(32, 1536, 2048, 2)
  assert (t["n_tiles"], t["split_k"], t["split_tiles"], t["block_k"]) == (32, 4, 3, 128)
  # 256 rows: float32 partials would cost more than w itself, so no split.
  assert decode_gemm.kernel_tuning(256, 1536, 2048, 2)["split_k"] == 1
  # 3 K tiles asked to split 2 ways: tiles of 2 and 1; 4 ways: only 3 splits get a tile.
  assert decode_gemm.kernel_tuning(24, 96, 80, 4, block_k=32, split_k=2)["split_tiles"] == 2
  assert decode_gemm.kernel_tuning(24, 96, 80, 4, block_k=32, split_k=4)["split_k"] == 3
  # Tiles no larger than the array they tile.
  t = decode_gemm.kernel_tuning(24, 40, 48, 4, block_n=128, block_k=128)
  assert (t["block_m"], t["block_k"], t["block_n"]) == (32, 32, 32)


@pytest.mark.parametrize("call,message", [
    (lambda a: decode_gemm.norm_matmul(a["x"][0], a["g"], a["w"], eps=EPS),
     "x must have rank 2"),
    (lambda a: decode_gemm.norm_matmul(a["x"], a["g"], a["w"].T, eps=EPS),
     r"w must have shape \[24, outputs\]"),
    (lambda a: decode_gemm.norm_matmul(a["x"], a["g"][:8], a["w"], eps=EPS),
     r"norm_weight must have shape \(24,\)"),
    (lambda a: decode_gemm.norm_matmul(a["x"], a["g"], a["w"], a["b"][:3], eps=EPS),
     r"bias must have shape \(16,\)"),
    (lambda a: decode_gemm.norm_matmul(a["x"].astype(jnp.int32), a["g"], a["w"], eps=EPS),
     "x must be bfloat16 or float32"),
    (lambda a: decode_gemm.norm_matmul(a["x"], a["g"], a["w"].astype(jnp.float16), eps=EPS),
     "w must be bfloat16 or float32"),
    (lambda a: decode_gemm.matmul_residual(a["x"], a["w"], a["r"].T),
     r"residual must have shape \(8, 16\)"),
    (lambda a: decode_gemm.norm_matmul(jnp.zeros((257, 24)), a["g"], a["w"], eps=EPS,
                                       impl="interpret"),
     "x has 257 rows; the kernel takes 1..256"),
    (lambda a: decode_gemm.norm_matmul(a["x"][:, :8], a["g"][:8], a["w"][:8], eps=EPS,
                                       impl="interpret"),
     "the kernel needs features and outputs >= 16"),
    (lambda a: decode_gemm.matmul_residual(a["x"], a["w"], a["r"], impl="interpret",
                                           block_m=32),
     r"unknown tuning arguments \['block_m'\]"),
    (lambda a: decode_gemm.matmul_residual(a["x"], a["w"], a["r"], impl="interpret",
                                           block_n=48),
     "block_n=48 must be a power of two >= 16"),
    (lambda a: decode_gemm.matmul_residual(a["x"], a["w"], a["r"], impl="interpret",
                                           split_k=0),
     "split_k=0 must be >= 1"),
])
def test_bad_input_fails_with_a_message_naming_it(call, message):
  x, g, w, b, r = _inputs(8, 24, 16, jnp.float32)
  with pytest.raises(ValueError, match=message):
    call(dict(x=x, g=g, w=w, b=b, r=r))
