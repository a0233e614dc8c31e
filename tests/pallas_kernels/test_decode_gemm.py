"""decode_gemm's Triton kernels (interpret mode) against their float32 references."""

import jax
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
    # Splits finished in the kernel (the last program of a tile sums the partials and runs
    # the norm and bias epilogue), padded rows and a masked last N tile.
    (24, 96, 80, jnp.float32, True, dict(block_n=32, block_k=32, split_k=3, finish="kernel")),
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
    (96, 96, 80, jnp.bfloat16, dict(block_n=32, block_k=32, split_k=2, finish="kernel")),
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
  # 256 rows (near the ridge point): one split would be 32 programs, 100 SMs idle in a
  # compute-bound GEMM; 4 splits cost 17 MB of float32 partials and still win in the model.
  assert decode_gemm.kernel_tuning(256, 1536, 2048, 2)["split_k"] == 4
  assert (decode_gemm.launch_seconds(256, 1536, 2048, 32, 4, 2)
          < decode_gemm.launch_seconds(256, 1536, 2048, 32, 1, 2))
  # The gate/up width of 8960 columns: 140 programs fill the GPU without splits.
  assert decode_gemm.kernel_tuning(256, 1536, 8960, 2)["split_k"] == 1
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
    (lambda a: decode_gemm.matmul_residual(a["x"], a["w"], a["r"], impl="interpret",
                                           finish="atomic"),
     "finish='atomic' must be one of"),
    (lambda a: decode_gemm.norm_matmul(a["x"], a["g"], (a["w"], a["w"]), (a["b"],), eps=EPS),
     "1 biases for 2 weights"),
    (lambda a: decode_gemm.norm_matmul(a["x"], a["g"], (a["w"], a["w"][:, :8]), eps=EPS,
                                       impl="interpret"),
     r"grouped weights need output widths that are multiples of 16, got \[16, 8\]"),
    (lambda a: decode_gemm.norm_matmul(a["x"], a["g"], (a["w"], a["w"].T), eps=EPS),
     r"w\[1\] must have shape \[24, outputs\]"),
    (lambda a: decode_gemm.norm_qkv_rope(a["x"], a["g"], (a["w"], a["w"]), rope_cos=a["c"],
                                         rope_sin=a["c"], eps=EPS),
     r"w must be the tuple \(w_q, w_k, w_v\)"),
    (lambda a: decode_gemm.norm_qkv_rope(a["x"], a["g"], (a["w"],) * 3, rope_cos=a["c"][:4],
                                         rope_sin=a["c"][:4], eps=EPS),
     r"rope_cos and rope_sin must both have shape \[8, head_dim / 2\]"),
    (lambda a: decode_gemm.norm_qkv_rope(a["x"], a["g"], (a["w"],) * 3,
                                         rope_cos=jnp.zeros((8, 16)), rope_sin=jnp.zeros((8, 16)),
                                         eps=EPS),
     "w_q has 16 outputs, not a multiple of head_dim=32"),
    (lambda a: decode_gemm.norm_qkv_rope(a["x"], a["g"], (a["w"],) * 3, rope_cos=a["c"],
                                         rope_sin=a["c"], head_norms=(a["g"], a["g"]), eps=EPS),
     r"the q head norm must have shape \(16,\)"),
    (lambda a: decode_gemm.norm_qkv_rope(a["x"], a["g"], (a["w"],) * 3, rope_cos=a["c"],
                                         rope_sin=a["c"], eps=EPS, impl="interpret"),
     "the kernel needs a power-of-two head_dim >= 32"),
    (lambda a: decode_gemm.norm_swiglu(a["x"], a["g"], a["w"], eps=EPS),
     r"w_gate_up must have shape \[24, 2, intermediate\]"),
    (lambda a: decode_gemm.greedy_head(a["x"], a["w"], layout="hv"),
     "layout must be one of"),
    (lambda a: decode_gemm.greedy_head(a["x"], a["w"], layout="ve"),
     r"w with layout 've' must have shape \[vocab, hidden\] with hidden = 24"),
    (lambda a: decode_gemm.greedy_head(a["x"], a["w"], layout="ev", excluded_token=16),
     r"excluded_token=16 is outside the vocabulary \[0, 16\)"),
    (lambda a: decode_gemm.greedy_head(a["x"], a["w"], layout="ev", impl="interpret",
                                       split_k=2),
     r"greedy_head: unknown tuning arguments \['split_k'\]"),
])
def test_bad_input_fails_with_a_message_naming_it(call, message):
  x, g, w, b, r = _inputs(8, 24, 16, jnp.float32)
  with pytest.raises(ValueError, match=message):
    call(dict(x=x, g=g, w=w, b=b, r=r, c=jnp.zeros((8, 8))))


# Grouped weights (q, k, v as the model stores them): one launch, outputs split per weight.
# Widths 64 / 32 / 32 in tiles of 32 (each tile inside one weight), with biases and one K
# split; without biases over two splits (partials finished by XLA); block_n 64 asked for,
# fitted down to 32 so no tile straddles two weights.
@pytest.mark.parametrize("rows,dtype,with_bias,tuning", [
    (24, jnp.float32, True, dict(block_n=32, block_k=32, split_k=1)),
    (40, jnp.bfloat16, False, dict(block_n=64, block_k=32, split_k=2)),
    (24, jnp.float32, True, dict(block_n=16, block_k=32, split_k=2, finish="kernel")),
])
def test_grouped_norm_matmul_matches_each_weight(rows, dtype, with_bias, tuning):
  x, norm_weight, w, bias, _ = _inputs(rows, 96, 128, dtype, seed=2)
  ws = (w[:, :64], w[:, 64:96], w[:, 96:])
  biases = (bias[:64], bias[64:96], bias[96:]) if with_bias else None
  got = decode_gemm.norm_matmul(x, norm_weight, ws, biases, eps=EPS, impl="interpret", **tuning)
  assert isinstance(got, tuple) and len(got) == 3
  for i, (out, wi) in enumerate(zip(got, ws)):
    want = decode_gemm.norm_matmul_reference(x, norm_weight, wi,
                                             None if biases is None else biases[i], eps=EPS)
    _assert_close(out, want, dtype)


def _qkv_inputs(rows, heads, head_dim, dtype, bias, head_norms, seed=8):
  rng = np.random.default_rng(seed)
  arr = lambda *shape, scale=1.0: jnp.asarray(rng.standard_normal(shape) * scale, dtype)
  x = arr(rows, 96) * jnp.asarray(np.geomspace(0.1, 30.0, rows)[:, None], dtype)
  ws = tuple(arr(96, h * head_dim, scale=96 ** -0.5) for h in heads)
  biases = tuple(arr(h * head_dim) for h in heads) if bias else None
  norms = (1 + arr(head_dim, scale=0.2), 1 + arr(head_dim, scale=0.2)) if head_norms else None
  cos, sin = decode_gemm.rope_tables(jnp.asarray(rng.integers(0, 130000, rows)), 1e6,
                                     head_dim)
  return x, 1 + arr(96, scale=0.3), ws, biases, norms, cos, sin


# Qwen2.5-like (biases, no head norms) with two programs per head of 64 (rotary pairs of 16
# columns: [c, c + 16) with [c + 32, c + 48)); Qwen3-like (head norms: one program per head) in
# bfloat16 at padded rows; K split in two (the partials finished by XLA), and K splits
# finished in the kernel (the last program of a tile runs norms and RoPE on the sums).
@pytest.mark.parametrize("rows,dtype,bias,head_norms,tuning", [
    (24, jnp.float32, True, False, dict(block_n=32, split_k=1)),
    (40, jnp.bfloat16, False, True, dict(split_k=1)),
    (24, jnp.float32, True, True, dict(block_k=32, split_k=2)),
    (24, jnp.float32, True, True, dict(block_k=32, split_k=3, finish="kernel")),
    (40, jnp.bfloat16, True, False, dict(block_n=32, block_k=32, split_k=2, finish="kernel")),
])
def test_norm_qkv_rope_matches_reference(rows, dtype, bias, head_norms, tuning):
  x, g, ws, biases, norms, cos, sin = _qkv_inputs(rows, (4, 2, 2), 64, dtype, bias, head_norms)
  got = decode_gemm.norm_qkv_rope(x, g, ws, biases, rope_cos=cos, rope_sin=sin,
                                  head_norms=norms, eps=EPS, impl="interpret", **tuning)
  want = decode_gemm.norm_qkv_rope_reference(x, g, ws, biases, norms, cos, sin, eps=EPS)
  for out, ref in zip(got, want):
    _assert_close(out, ref, dtype)


def test_norm_qkv_rope_reference_is_the_models_attention_input():
  """The reference against the model's own layers: input norm, projections, per-head norm,
  mage_jax.model.apply_rope (q and k), nothing after v."""
  from mage_jax.model import apply_rope  # pylint: disable=import-outside-toplevel
  x, g, ws, biases, norms, _, _ = _qkv_inputs(6, (4, 2, 2), 32, jnp.float32, True, True)
  positions = jnp.arange(6, dtype=jnp.int32) * 997
  cos, sin = decode_gemm.rope_tables(positions, 1e6, 32)
  q, k, v = decode_gemm.norm_qkv_rope_reference(x, g, ws, biases, norms, cos, sin, eps=EPS)
  h = decode_gemm.norm_matmul_reference(x, g, ws[0], biases[0], eps=EPS)
  heads = h.reshape(1, 6, 4, 32)
  heads = heads * jax.lax.rsqrt(jnp.mean(heads * heads, -1, keepdims=True) + EPS) * norms[0]
  np.testing.assert_allclose(q, apply_rope(heads, positions[None], 1e6).reshape(6, 128),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v, decode_gemm.norm_matmul_reference(x, g, ws[2], biases[2],
                                                                   eps=EPS), rtol=1e-6)
  assert k.shape == (6, 64)


# Rows not a power of two, intermediate width not a multiple of the tile (masked gate and up
# columns), one K split and three (the activation applied by XLA after the partials).
@pytest.mark.parametrize("rows,dtype,tuning", [
    (24, jnp.float32, dict(block_n=32, block_k=32, split_k=1)),
    (96, jnp.bfloat16, dict(block_n=16, block_k=32, split_k=3)),
    (24, jnp.float32, dict(block_n=32, block_k=32, split_k=3, finish="kernel")),
])
def test_norm_swiglu_matches_reference(rows, dtype, tuning):
  x, norm_weight, _, _, _ = _inputs(rows, 96, 8, dtype, seed=3)
  w = jnp.asarray(np.random.default_rng(4).standard_normal((96, 2, 72)) / np.sqrt(96), dtype)
  got = decode_gemm.norm_swiglu(x, norm_weight, w, eps=EPS, impl="interpret", **tuning)
  _assert_close(got, decode_gemm.norm_swiglu_reference(x, norm_weight, w, eps=EPS), dtype)


def test_norm_swiglu_reference_is_silu_gate_times_up():
  x, norm_weight, _, _, _ = _inputs(5, 24, 8, jnp.float32)
  w = jnp.asarray(np.random.default_rng(5).standard_normal((24, 2, 16)), jnp.float32)
  x64, g = np.asarray(x, np.float64), np.asarray(norm_weight, np.float64)
  h = x64 / np.sqrt(np.mean(x64**2, axis=1, keepdims=True) + EPS) * g
  gate, up = h @ np.asarray(w[:, 0], np.float64), h @ np.asarray(w[:, 1], np.float64)
  np.testing.assert_allclose(decode_gemm.norm_swiglu_reference(x, norm_weight, w, eps=EPS),
                             gate / (1 + np.exp(-gate)) * up, rtol=1e-5, atol=1e-5)


def _head_inputs(rows, hidden, vocab, layout, seed=6, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  h = rng.standard_normal((rows, hidden))
  w = rng.standard_normal((hidden, vocab)) / np.sqrt(hidden)
  return jnp.asarray(h, dtype), jnp.asarray(w if layout == "ev" else w.T, dtype)


def _softmax_pick(hidden, w, layout, excluded):
  """float64 numpy: argmax of the logits without ``excluded`` and its probability."""
  logits = np.asarray(hidden, np.float64) @ np.asarray(w if layout == "ev" else w.T, np.float64)
  if excluded is not None:
    logits[:, excluded] = -np.inf
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  tokens = logits.argmax(axis=1)
  return tokens, probs[np.arange(len(tokens)), tokens]


# Both weight layouts; a vocabulary that leaves a short last tile (200 = 12 x 16 + 8 with
# block_n 16; 193 with block_n 32: one column), whose only column is the excluded token in the
# last case (a tile of -inf only). Row 0's largest logit is made the excluded token's (it must
# be neither proposed nor counted in the probability); row 1's largest is made a tie between
# tokens 5 and 150, in different tiles (the lower id wins, as jnp.argmax).
@pytest.mark.parametrize("layout,vocab,excluded,tuning", [
    ("ev", 200, None, dict(block_n=16, block_k=32)),
    ("ve", 200, 7, dict(block_n=32, block_k=32)),
    ("ve", 193, 192, dict(block_n=32)),
])
def test_greedy_head_matches_softmax_argmax(layout, vocab, excluded, tuning):
  hidden, w = _head_inputs(24, 96, vocab, layout)
  columns = w if layout == "ev" else w.T
  columns = columns.at[:, 5].set(0.3 * jnp.sign(hidden[1])).at[:, 150].set(
      0.3 * jnp.sign(hidden[1]))
  if excluded is not None:
    columns = columns.at[:, excluded].set(0.5 * jnp.sign(hidden[0]))
    assert _softmax_pick(hidden, columns, "ev", None)[0][0] == excluded
  w = columns if layout == "ev" else columns.T
  tokens, confidence = decode_gemm.greedy_head(hidden, w, layout=layout, excluded_token=excluded,
                                               impl="interpret", **tuning)
  want_tokens, want_conf = _softmax_pick(hidden, w, layout, excluded)
  assert want_tokens[1] == 5
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_allclose(confidence, want_conf, rtol=1e-5, atol=1e-6)
  ref_tokens, ref_conf = decode_gemm.greedy_head_reference(hidden, w, layout=layout,
                                                           excluded_token=excluded)
  np.testing.assert_array_equal(ref_tokens, want_tokens)
  np.testing.assert_allclose(ref_conf, want_conf, rtol=1e-5, atol=1e-6)


def test_kernels_lower_for_the_gpu_at_model_shapes():
  """The Triton lowering of every entry point at the 1.5B shapes (q/k/v as three weights, K
  splits at 32 rows, none at 256; the tied head over the full vocabulary), checked on the CPU
  by lowering for CUDA: what interpret mode cannot catch (an op the Triton lowering lacks)."""
  bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  qkv = (bf16(1536, 1536), bf16(1536, 256), bf16(1536, 256))
  biases = (bf16(1536), bf16(256), bf16(256))
  calls = [
      (lambda x, g, ws, bs: decode_gemm.norm_matmul(x, g, ws, bs, eps=EPS, impl="pallas"),
       (bf16(32, 1536), bf16(1536), qkv, biases)),
      # Qwen2.5's biases (two rotary programs per head at 256 rows) and Qwen3's head norms (a
      # program per head; 32 rows, K unsplit so that the norms run in the kernel).
      (lambda x, g, ws, bs, c, s: decode_gemm.norm_qkv_rope(
          x, g, ws, bs, rope_cos=c, rope_sin=s, eps=EPS, impl="pallas"),
       (bf16(256, 1536), bf16(1536), qkv, biases, f32(256, 64), f32(256, 64))),
      (lambda x, g, ws, n, c, s: decode_gemm.norm_qkv_rope(
          x, g, ws, rope_cos=c, rope_sin=s, head_norms=n, eps=EPS, impl="pallas", split_k=1),
       (bf16(32, 1536), bf16(1536), qkv, (bf16(128), bf16(128)), f32(32, 64), f32(32, 64))),
      (lambda x, g, w: decode_gemm.norm_swiglu(x, g, w, eps=EPS, impl="pallas"),
       (bf16(256, 1536), bf16(1536), bf16(1536, 2, 8960))),
      (lambda x, w, r: decode_gemm.matmul_residual(x, w, r, impl="pallas"),
       (bf16(96, 8960), bf16(8960, 1536), bf16(96, 1536))),
      # K splits finished in the kernel: barrier, atomic count, the last program's epilogue.
      (lambda x, w, r: decode_gemm.matmul_residual(x, w, r, impl="pallas", finish="kernel"),
       (bf16(32, 8960), bf16(8960, 1536), bf16(32, 1536))),
      (lambda x, g, ws, bs, c, s: decode_gemm.norm_qkv_rope(
          x, g, ws, bs, rope_cos=c, rope_sin=s, eps=EPS, impl="pallas", finish="kernel"),
       (bf16(32, 1536), bf16(1536), qkv, biases, f32(32, 64), f32(32, 64))),
      (lambda x, g, w: decode_gemm.norm_swiglu(x, g, w, eps=EPS, impl="pallas", split_k=2,
                                               finish="kernel"),
       (bf16(32, 1536), bf16(1536), bf16(1536, 2, 8960))),
      (lambda x, w: decode_gemm.greedy_head(x, w, layout="ve", excluded_token=151665,
                                            impl="pallas"),
       (bf16(32, 1536), bf16(151936, 1536))),
  ]
  for call, args in calls:
    text = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text
