"""Choosing between a Pallas kernel and its plain-JAX reference.

Every kernel entry point takes ``impl``:
  * ``"auto"``: the Pallas (Triton) kernel on an NVIDIA GPU, the reference elsewhere
    (flash attention: its faster blockwise plain-JAX path, equal to the reference);
  * ``"pallas"``: the kernel, compiled for the GPU;
  * ``"interpret"``: the kernel run by the Pallas interpreter (any backend; tests on CPU);
  * ``"reference"``: the plain-JAX reference.
The default can be overridden for a whole process with ``MAGE_KERNEL_IMPL``.
"""

import os

import jax

IMPLS = ("auto", "pallas", "interpret", "reference")


def requested_impl(impl: str = "auto") -> str:
  """``impl`` with the process-wide ``MAGE_KERNEL_IMPL`` override applied to "auto"."""
  return os.environ.get("MAGE_KERNEL_IMPL", "auto") if impl == "auto" else impl


def resolve_impl(impl: str = "auto") -> str:
  """Returns one of "pallas", "interpret", "reference" for ``impl``."""
  impl = requested_impl(impl)
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "reference"
  return impl
