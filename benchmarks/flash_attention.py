"""Checks and times block-diffusion flash attention on the GPU, in one call.

1. Correctness: kernel vs the float32 reference at small sizes (bf16 inputs),
   forward, lse and gradients, prefill, prefill chunk and training layouts.
2. The bf16 matmul rate (8192^3), the ceiling the attention rates are read
   against.
3. Optionally (--sweep) tile settings at 32K tokens, 1.5B shape; the best
   forward, dq and dk/dv settings are used for the table.
4. Forward and forward+backward at the --sizes on the Fast-dLLM v2 1.5B
   (12 q / 2 kv heads) and 7B (28 / 4) shapes, head_dim 128, prefill
   block-causal mask with block 32; beside it cuDNN causal attention and jax's
   Pallas `mha` (causal, K/V repeated to the query heads) as stand-ins.
   TFLOP/s count the FLOPs of the pairs each mask keeps (4 * pairs * head_dim
   per head forward, 2.5 times that backward, the usual convention).
5. Ours on the doubled training sequence (2 x 16K tokens) for reference.

Usage: python benchmarks/flash_attention.py --out DIR [--sweep]
"""

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

# The repository root, so the script runs without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels import flash_attention as fa  # pylint: disable=wrong-import-position

BLOCK = 32
HEAD_DIM = 128
SHAPES = {"1.5B": (12, 2), "7B": (28, 4)}


def timed(fn, args, reps):
  """Median wall time (ms) of fn(*args) after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def rel_err(got, want):
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  if not np.isfinite(got).all():
    return float("nan")
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def random_qkv(seed, batch, q_len, kv_len, q_heads, kv_heads, dtype):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (batch, q_len, q_heads, HEAD_DIM), dtype)
  k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, HEAD_DIM), dtype)
  v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, HEAD_DIM), dtype)
  d_out = jax.random.normal(keys[3], q.shape, dtype)
  return q, k, v, d_out


def check_correctness(log):
  """Kernel vs reference on bf16 inputs; returns rows of relative errors."""
  cases = [
      ("prefill 1000, G=6", 1, 1000, 1000, 12, 2,
       fa.prefill_token_blocks(1, 1000, BLOCK),
       fa.prefill_token_blocks(1, 1000, BLOCK), [1000]),
      ("chunk 300 @2000 over cache 2400, ragged, G=7", 2, 300, 2400, 28, 4,
       fa.prefill_token_blocks(2, 300, BLOCK, start=2000),
       fa.prefill_token_blocks(2, 2400, BLOCK), [2300, 2100]),
      ("training 2x700, ragged, G=7", 2, 1400, 1400, 28, 4,
       fa.training_token_blocks(2, 700, BLOCK),
       fa.training_token_blocks(2, 700, BLOCK), [1400, 1100]),
  ]
  rows = []
  for name, batch, q_len, kv_len, hq, hkv, q_seg, kv_seg, lengths in cases:
    q, k, v, d_out = random_qkv(len(rows), batch, q_len, kv_len, hq, hkv,
                                jnp.bfloat16)
    lengths = jnp.array(lengths, jnp.int32)
    kernel = lambda q, k, v: fa.block_diffusion_attention(
        q, k, v, q_seg, kv_seg, lengths, return_lse=True, impl="pallas")
    reference = lambda q, k, v: fa.block_diffusion_attention_reference(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
        q_seg, kv_seg, lengths, return_lse=True)
    row = {"case": name}
    try:
      (out, lse), vjp = jax.vjp(kernel, q, k, v)
      (ref_out, ref_lse), ref_vjp = jax.vjp(reference, q, k, v)
      d_lse = jnp.zeros_like(lse)
      grads = vjp((d_out, d_lse))
      ref_grads = ref_vjp((d_out.astype(jnp.float32), d_lse))
      finite = np.isfinite(np.asarray(ref_lse))
      row.update(
          out=rel_err(out, ref_out),
          lse=rel_err(np.asarray(lse)[finite], np.asarray(ref_lse)[finite]),
          lse_inf_match=bool(np.array_equal(np.isinf(lse), ~finite)),
          dq=rel_err(grads[0], ref_grads[0]),
          dk=rel_err(grads[1], ref_grads[1]),
          dv=rel_err(grads[2], ref_grads[2]),
      )
      row["ok"] = row["lse_inf_match"] and all(
          row[key] < 1e-2 for key in ("out", "lse", "dq", "dk", "dv"))
    except Exception as e:  # pylint: disable=broad-except
      row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
      traceback.print_exc()
    log(f"check {row}")
    rows.append(row)
  return rows


def matmul_tflops(log):
  a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16)
  b = jax.random.normal(jax.random.PRNGKey(1), (8192, 8192), jnp.bfloat16)
  matmul = jax.jit(jnp.dot)
  # Two seconds of products first, so the clocks are up before timing.
  deadline = time.perf_counter() + 2.0
  while time.perf_counter() < deadline:
    jax.block_until_ready(matmul(a, b))
  ms = timed(matmul, (a, b), 50)
  rate = 2 * 8192**3 / ms / 1e9
  log(f"matmul 8192^3 bf16: {ms:.3f} ms, {rate:.0f} TFLOP/s")
  return rate


def block_causal_pairs(n: int, block: int) -> int:
  """Exactly the (query, key) pairs of the prefill mask over n tokens."""
  pos = np.arange(n, dtype=np.int64)
  return int(np.minimum(n, (pos // block + 1) * block).sum())


def training_pairs(seq_len: int, block: int) -> int:
  """Exactly the pairs of the doubled [x_t | x_0] training mask."""
  pos = np.arange(seq_len, dtype=np.int64)
  start = pos // block * block
  own_block = np.minimum(seq_len, start + block) - start
  noisy_rows = own_block + start  # Own noisy block, earlier clean blocks.
  clean_rows = np.minimum(seq_len, start + block)
  return int(noisy_rows.sum() + clean_rows.sum())


def ours(tiles):
  def make(q_seg, lengths):
    return lambda q, k, v: fa.block_diffusion_attention(
        q, k, v, q_seg, q_seg, lengths, impl="pallas", **tiles)
  return make


def cudnn(q_seg, lengths):
  del q_seg, lengths
  return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn")


def jax_pallas_mha(q_seg, lengths):
  del q_seg, lengths
  # Imported here: deprecated upstream, and only this stand-in needs it.
  from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=import-outside-toplevel
  return lambda q, k, v: attention.mha(
      q, k, v, None, sm_scale=HEAD_DIM**-0.5, causal=True)


def measure(impl_name, make, n, q_heads, kv_heads, reps, matmul, log,
            backward=True, training=False):
  """Times forward and forward+backward of one implementation at n tokens.

  With ``training`` the n tokens are the doubled sequence [x_t | x_0].
  """
  row = {"impl": impl_name, "tokens": n, "q_heads": q_heads,
         "kv_heads": kv_heads}
  repeat = impl_name == "jax pallas mha"
  segments = fa.prefill_token_blocks(1, n, BLOCK)
  if training:
    segments = fa.training_token_blocks(1, n // 2, BLOCK)
    pairs = training_pairs(n // 2, BLOCK)
    row["mask"] = f"training [x_t | x_0], block {BLOCK}"
  elif impl_name.startswith("block_diffusion"):
    pairs = block_causal_pairs(n, BLOCK)
    row["mask"] = f"block-causal, block {BLOCK}"
  else:
    pairs = n * (n + 1) // 2
    row["mask"] = "causal"
  fwd_flops = 4 * pairs * HEAD_DIM * q_heads
  try:
    q, k, v, d_out = random_qkv(n, 1, n, n, q_heads, kv_heads, jnp.bfloat16)
    if repeat:
      k = jnp.repeat(k, q_heads // kv_heads, axis=2)
      v = jnp.repeat(v, q_heads // kv_heads, axis=2)
    attention = make(segments, jnp.array([n], jnp.int32))
    fwd = jax.jit(attention)
    row["fwd_ms"] = timed(fwd, (q, k, v), reps)
    row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
    row["fwd_frac_matmul"] = row["fwd_tflops"] / matmul
    if backward:
      fwd_bwd = jax.jit(lambda q, k, v, d: jax.vjp(attention, q, k, v)[1](d))
      row["fwd_bwd_ms"] = timed(fwd_bwd, (q, k, v, d_out), reps)
      row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
      row["bwd_tflops"] = 2.5 * fwd_flops / row["bwd_ms"] / 1e9
      row["bwd_frac_matmul"] = row["bwd_tflops"] / matmul
      row["fwd_bwd_tflops"] = 3.5 * fwd_flops / row["fwd_bwd_ms"] / 1e9
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = f"{type(e).__name__}: {e}"[:1500]
    log(traceback.format_exc()[-3000:])
  log(f"row {json.dumps(row)}")
  return row


def sweep(matmul, log):
  """Tile settings at 32K tokens, 1.5B shape; returns each kernel's best."""
  n, (hq, hkv) = 32768, SHAPES["1.5B"]
  base = dataclasses.asdict(fa.TileConfig())
  results = {"fwd": [], "dq": [], "dkv": []}
  fwd_options = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3),
                 (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4)]
  for bq, bkv, warps, stages in fwd_options:
    tiles = dict(block_q=bq, block_kv=bkv, num_warps=warps, num_stages=stages)
    row = measure("block_diffusion (ours)", ours(tiles), n, hq, hkv, 5,
                  matmul, log, backward=False)
    results["fwd"].append((tiles, row.get("fwd_ms", float("inf"))))
  for prefix, options in (
      ("dq", [(128, 64, 8, 2), (128, 32, 4, 3), (128, 64, 4, 3),
              (64, 64, 4, 3)]),
      ("dkv", [(64, 128, 8, 2), (32, 128, 4, 3), (64, 128, 8, 3),
               (32, 128, 8, 2), (128, 128, 8, 2)]),
  ):
    for bq, bkv, warps, stages in options:
      tiles = {f"{prefix}_block_q": bq, f"{prefix}_block_kv": bkv,
               f"{prefix}_num_warps": warps, f"{prefix}_num_stages": stages}
      row = measure("block_diffusion (ours)", ours(tiles), n, hq, hkv, 5,
                    matmul, log)
      results[prefix].append((tiles, row.get("bwd_ms", float("inf"))))
  best = dict(base)
  for prefix in results:
    tiles, ms = min(results[prefix], key=lambda r: r[1])
    log(f"best {prefix}: {tiles} {ms:.3f} ms")
    best.update(tiles)
  return best, results


def to_markdown(meta, checks, rows, sweep=None):
  lines = [
      "# Block-diffusion flash attention: GPU results",
      "",
      f"Device: {meta['device']}; jax {meta['jax']}; {meta['date']}.",
      f"bf16 8192^3 matmul: {meta['matmul_tflops']:.0f} TFLOP/s (the "
      "ceiling below). Tiles: `" + json.dumps(meta["tiles"]) + "`.",
      "FLOPs count the pairs each mask keeps: 4 * pairs * head_dim per query "
      "head forward, 2.5x that backward; backward time = (fwd+bwd) - fwd.",
      "Stand-ins use the causal mask (N(N+1)/2 pairs), jax pallas mha with "
      "K/V repeated to the query heads.",
      "",
      "## Correctness (bf16 inputs vs float32 reference, relative L2 error)",
      "",
      "| case | out | lse | dq | dk | dv | ok |",
      "|---|---|---|---|---|---|---|",
  ]
  for c in checks:
    if "error" in c:
      lines.append(f"| {c['case']} | error: {c['error'][:200]} | | | | | no |")
    else:
      lines.append(
          f"| {c['case']} | {c['out']:.2e} | {c['lse']:.2e} | {c['dq']:.2e} "
          f"| {c['dk']:.2e} | {c['dv']:.2e} | {'yes' if c['ok'] else 'NO'} |")
  if sweep:
    lines += ["", "## Tile sweep (32K tokens, 1.5B shape; ms of the kernel's "
              "pass: fwd, or bwd = (fwd+bwd) - fwd)", ""]
    for kernel, results in sweep.items():
      for tiles, ms in results:
        lines.append(f"- {kernel}: `{json.dumps(tiles)}`: {ms:.2f} ms")
  lines += [
      "",
      "## Timings (batch 1, head_dim 128, medians)",
      "",
      "| shape | tokens | impl | mask | fwd ms | fwd TFLOP/s | fwd % mm "
      "| bwd ms | bwd TFLOP/s | bwd % mm | fwd+bwd ms |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    shape = f"{r['q_heads']}q/{r['kv_heads']}kv"
    r = {**r, "mask": r["mask"].replace("|", "\\|")}
    if "error" in r and "fwd_ms" not in r:
      lines.append(f"| {shape} | {r['tokens']} | {r['impl']} | {r['mask']} | "
                   f"failed: {r['error'][:120]} | | | | | | |")
      continue
    get = lambda key, fmt: format(r[key], fmt) if key in r else "-"
    lines.append(
        f"| {shape} | {r['tokens']} | {r['impl']} | {r['mask']} | "
        f"{get('fwd_ms', '.2f')} | {get('fwd_tflops', '.0f')} | "
        f"{100 * r['fwd_frac_matmul']:.0f}% | {get('bwd_ms', '.2f')} | "
        f"{get('bwd_tflops', '.0f')} | "
        + (f"{100 * r['bwd_frac_matmul']:.0f}%" if "bwd_frac_matmul" in r
           else "-")
        + f" | {get('fwd_bwd_ms', '.2f')} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/fa_bench"))
  parser.add_argument("--sweep", action="store_true")
  parser.add_argument("--sizes", default="32768,65536,131072")
  parser.add_argument("--skip-standins", action="store_true")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  log_file = open(os.path.join(args.out, "log.txt"), "a")

  def log(msg):
    print(msg, flush=True)
    log_file.write(msg + "\n")
    log_file.flush()

  meta = {
      "device": jax.devices()[0].device_kind,
      "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="minutes"),
  }
  log(f"meta {meta}")
  checks = check_correctness(log)
  meta["matmul_tflops"] = matmul_tflops(log)
  tiles, sweep_results = {}, None
  if args.sweep:
    tiles, sweep_results = sweep(meta["matmul_tflops"], log)
  meta["tiles"] = tiles or dataclasses.asdict(fa.TileConfig())
  rows = []

  def save():
    with open(os.path.join(args.out, "flash_attention.json"), "w") as f:
      json.dump({"meta": meta, "checks": checks, "rows": rows,
                 "sweep": sweep_results}, f, indent=1)
    with open(os.path.join(args.out, "flash_attention.md"), "w") as f:
      f.write(to_markdown(meta, checks, rows, sweep_results))

  impls = [("block_diffusion (ours)", ours(tiles))]
  if not args.skip_standins:
    impls += [("cudnn causal", cudnn), ("jax pallas mha", jax_pallas_mha)]
  for name, make in impls:
    for shape, (hq, hkv) in SHAPES.items():
      for n in (int(s) for s in args.sizes.split(",")):
        reps = 3 if n >= 131072 else 5
        rows.append(measure(name, make, n, hq, hkv, reps,
                            meta["matmul_tflops"], log))
        save()
  for shape, (hq, hkv) in SHAPES.items():
    rows.append(measure("block_diffusion (ours)", ours(tiles), 32768, hq, hkv,
                        5, meta["matmul_tflops"], log, training=True))
    save()
  save()
  print(to_markdown(meta, checks, rows, sweep_results))


if __name__ == "__main__":
  main()
