"""Index selection for TPU: the exact radix threshold select of `pallas_kernels.topk`.

That select is plain XLA (compares, reductions, two prefix sums, one scatter; no sort), so it
runs on a TPU as it is, and gives the same selections as the GPU path and as the `lax.top_k`
reference, ties included. docs/tpu.md says why it was chosen over `lax.top_k` (a sort) and
`lax.approx_max_k` (approximate: it would change which rows MAGE keeps). There is no kernel:
``interpret`` is accepted so that dispatch can swap this entry point for the GPU one, and
changes nothing.
"""

from pallas_kernels import topk
from pallas_kernels.topk import select_kv_indices_reference


def select_kv_indices(scores, lengths, k: int, *, budgets=None, interpret: bool = False,
                      radix_bits: int = 4, chunk_size: int = 1024):
  """Positions of the min(budget, length) largest scores per row, sorted ascending.

  Args:
    scores, lengths, k, budgets, radix_bits, chunk_size: as for
      `pallas_kernels.topk.select_kv_indices`. 4 radix bits (8 passes over the scores, 15
      compares per score and pass) keep the passes few while the compares stay cheap next to
      reading the scores from HBM (docs/tpu.md).
    interpret: accepted for the entry points' common signature; the select is XLA either way.

  Returns:
    (indices int32 [..., k]: selected positions ascending in the first `counts` slots, 0 in the
    rest; counts int32 scores.shape[:-1] = min(budget, length)).
  """
  del interpret  # plain XLA: nothing to interpret
  topk._check_inputs(scores, lengths, k, budgets)
  if radix_bits not in (1, 2, 4, 8):
    raise ValueError(f"radix_bits must be 1, 2, 4 or 8, got {radix_bits}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  return topk._radix_select(scores, lengths, budgets, k=k, radix_bits=radix_bits,
                            chunk_size=chunk_size)


__all__ = ["select_kv_indices", "select_kv_indices_reference"]
