"""merge_splits (interpret mode) against the XLA merge that defines it."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention
from pallas_kernels import merge_splits


def _partials(rng, batch, splits, rows, head_dim, dtype):
  out = jnp.asarray(rng.standard_normal((batch, splits, rows, head_dim)), dtype)
  lse = rng.standard_normal((batch, splits, rows)).astype(np.float32) * 6.0
  lse[rng.random(lse.shape) < 0.3] = -np.inf  # splits that saw no key of a row
  lse[0, :, 0] = -np.inf  # a row no split saw
  return out, jnp.asarray(lse)


def _merged_float64(out, lse):
  out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
  top = np.max(lse, axis=1, keepdims=True)
  weights = np.exp2(lse - np.where(np.isfinite(top), top, 0.0))
  total = weights.sum(axis=1)
  merged = (weights[..., None] * out).sum(axis=1)
  return merged / np.where(total > 0, total, 1.0)[..., None]


# Splits: 1, a power of two, not one (the last tile starts early), more than MAX_CHUNK (several
# tiles), far more (a ragged last tile over 130).
@pytest.mark.parametrize("batch,splits,rows,head_dim", [
    (2, 1, 5, 16), (1, 8, 3, 64), (2, 45, 7, 128), (1, 70, 4, 32), (3, 130, 2, 16)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_matches_float64_and_the_xla_merge(batch, splits, rows, head_dim, dtype):
  rng = np.random.default_rng(splits * 10 + rows)
  out, lse = _partials(rng, batch, splits, rows, head_dim, dtype)
  got = merge_splits.merge_splits(out, lse, out_dtype=jnp.float32, interpret=True)
  assert got.shape == (batch, rows, head_dim) and got.dtype == jnp.float32
  want = _merged_float64(out, lse)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got)[0, 0], 0.0)  # no split saw the row
  xla = merge_splits.merge_splits_reference(out, lse, out_dtype=jnp.float32)
  np.testing.assert_allclose(got, xla, atol=1e-5, rtol=1e-5)
  assert merge_splits.merge_splits(out, lse, interpret=True).dtype == dtype


def _lse_float64(lse):
  lse = np.asarray(lse, np.float64)
  top = np.max(lse, axis=1)
  finite_top = np.where(np.isfinite(top), top, 0.0)
  total = np.exp2(lse - finite_top[:, None]).sum(axis=1)
  with np.errstate(divide="ignore"):
    return np.where(total > 0, finite_top + np.log2(total), -np.inf)


@pytest.mark.parametrize("batch,splits,rows,head_dim", [
    (2, 1, 5, 16), (1, 8, 3, 64), (2, 45, 7, 128), (1, 70, 4, 32), (3, 130, 2, 16)])
def test_merge_returns_the_log_sum_exp_of_the_leading_splits(batch, splits, rows, head_dim):
  rng = np.random.default_rng(splits + rows)
  out, lse = _partials(rng, batch, splits, rows, head_dim, jnp.float32)
  # The last split (the block's keys in the mask step) 400 above the rest in some rows: the
  # leading splits' log-sum-exp must not underflow against it.
  lse = np.asarray(lse).copy()
  lse[:, -1, 1:] = 400.0
  lse = jnp.asarray(lse)
  for lse_splits in sorted({splits, max(splits - 1, 1)}):
    got_out, got_lse = merge_splits.merge_splits(out, lse, interpret=True,
                                                 lse_splits=lse_splits)
    np.testing.assert_array_equal(got_out, merge_splits.merge_splits(out, lse, interpret=True))
    assert got_lse.shape == (batch, rows) and got_lse.dtype == jnp.float32
    want = _lse_float64(lse[:, :lse_splits])
    np.testing.assert_array_equal(np.isfinite(got_lse), np.isfinite(want))
    np.testing.assert_allclose(got_lse, want, rtol=1e-6, atol=1e-5)
    for how in ("xla", "pallas"):
      merged, xla_lse = merge_splits.merge(out, lse, how=how, interpret=True, out_dtype=None,
                                           lse_splits=lse_splits)
      np.testing.assert_allclose(xla_lse, want, rtol=1e-6, atol=1e-5)
      np.testing.assert_allclose(merged, got_out, atol=1e-5)
  with pytest.raises(ValueError, match="lse_splits must be in"):
    merge_splits.merge_splits(out, lse, interpret=True, lse_splits=splits + 1)


def test_auto_merge_uses_the_kernel_up_to_max_rows(monkeypatch):
  calls = []
  monkeypatch.setattr(merge_splits, "merge_splits",
                      lambda *a, **k: calls.append("pallas") or merge_splits.merge_splits_reference(
                          *a, out_dtype=k["out_dtype"]))
  most = merge_splits.PALLAS_MAX_ROWS
  for batch, rows in ((2, most // 2 + 1), (2, most // 2)):
    merge_splits.merge(jnp.zeros((batch, 3, rows, 16)), jnp.zeros((batch, 3, rows)), how="auto",
                       interpret=True, out_dtype=None)
  assert calls == ["pallas"]


def test_merge_rejects_mismatched_partials():
  out = jnp.zeros((1, 4, 3, 16))
  with pytest.raises(ValueError, match="partial_lse must have shape"):
    merge_splits.merge_splits(out, jnp.zeros((1, 4, 2)), interpret=True)
  with pytest.raises(ValueError, match="merge must be one of"):
    merge_splits.merge(out, jnp.zeros((1, 4, 3)), how="triton", interpret=True, out_dtype=None)


def test_attention_kernels_merge_the_same_either_way():
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((2, 8, 6, 64)), jnp.float32)
  k_cache, v_cache = (jnp.asarray(rng.standard_normal((2, 2, 90, 64)), jnp.float32)
                      for _ in range(2))
  k_block, v_block = (jnp.asarray(rng.standard_normal((2, 8, 2, 64)), jnp.float32)
                      for _ in range(2))
  args = (q, k_cache, v_cache, jnp.asarray([90, 41], jnp.int32), k_block, v_block)
  tuning = dict(block_k=16, num_splits=5)
  xla = decode_attention.exact_block_attention(*args, impl="interpret", merge="xla", **tuning)
  for how in ("pallas", "auto"):
    got = decode_attention.exact_block_attention(*args, impl="interpret", merge=how, **tuning)
    np.testing.assert_allclose(got, xla, atol=1e-6)
  with pytest.raises(ValueError, match="merge must be one of"):
    decode_attention.exact_block_attention(*args, impl="interpret", merge="nope")
