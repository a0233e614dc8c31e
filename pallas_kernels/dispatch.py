"""Which implementation runs a kernel: one setting, resolved once per backend.

The user-facing *setting* is one of ``SETTINGS``:
  * ``"auto"``: the fastest implementation of the backend (``AUTO``: the Triton kernels on an
    NVIDIA GPU, the Mosaic kernels of ``pallas_kernels.tpu`` on a TPU, the plain-JAX paths
    elsewhere);
  * ``"pallas"``: the Pallas Triton kernels, compiled for the GPU;
  * ``"interpret"``: the same kernels run by the Pallas interpreter (any backend; tests on CPU);
  * ``"mosaic"``: the Pallas TPU (Mosaic) kernels, compiled for the TPU;
  * ``"mosaic_interpret"``: the same kernels in Pallas' TPU interpret mode (tests on CPU);
  * ``"reference"``: the plain-JAX references (the dense oracles of the tests).
``resolve_impl`` turns a setting into a *resolved* value (``IMPLS``), the one every kernel entry
point (decode / mask-step / sparse / flash attention, top-k) receives as ``impl``: "pallas",
"interpret", "reference" as above, or "xla" ("auto" off the GPU: the fastest plain-JAX path,
flash attention's blockwise online softmax; the other kernels' single plain-JAX path, their
reference), "mosaic", "mosaic_interpret". Resolving a resolved value returns it unchanged. The
entry points of the parent package hand "mosaic" / "mosaic_interpret" to their counterparts in
``pallas_kernels.tpu`` (same arguments and outputs; the tuning keywords are the TPU kernel's).

One decode (or training run) has one setting: the jitted entry point that owns it (mage_jax's
decoding loop from ``DecodeOptions.kernels``, the trainer from ``TrainConfig.attention_impl``)
takes the resolved value as a static argument, so it is part of the jit key, and traces its
body inside ``use_kernels``; mage_jax's kernel call sites read ``active_impl()`` while tracing
and pass it on, nobody threads it by hand. As with ``jax.set_mesh``, a function jitted
elsewhere that reads the setting must take it in its jit key. Outside any scope it is "auto".
"""

import contextlib
import contextvars
from typing import Iterator

import jax

SETTINGS = ("auto", "pallas", "interpret", "mosaic", "mosaic_interpret", "reference")
IMPLS = ("pallas", "interpret", "mosaic", "mosaic_interpret", "xla", "reference")
AUTO = {"gpu": "pallas", "tpu": "mosaic"}  # what "auto" runs per backend; the others run "xla"
PLAIN_JAX = ("xla", "reference")  # resolved values that run no Pallas kernel
MOSAIC = ("mosaic", "mosaic_interpret")  # resolved values that run the TPU kernels

_ACTIVE: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernel_impl", default=None)


def resolve_impl(setting: str = "auto", backend: str | None = None) -> str:
  """One of ``IMPLS`` for ``setting`` (or a resolved value) on ``backend`` (default: JAX's)."""
  if setting in IMPLS:
    return setting
  if setting != "auto":
    raise ValueError(f"impl must be one of {SETTINGS} (or a resolved {IMPLS}), got {setting!r}")
  return AUTO.get(backend or jax.default_backend(), "xla")


@contextlib.contextmanager
def use_kernels(setting: str) -> Iterator[str]:
  """Runs the body with ``setting`` resolved as the active implementation; yields it."""
  token = _ACTIVE.set(resolve_impl(setting))
  try:
    yield _ACTIVE.get()
  finally:
    _ACTIVE.reset(token)


def active_impl() -> str:
  """The resolved implementation of the innermost ``use_kernels`` ("auto" resolved outside)."""
  return _ACTIVE.get() or resolve_impl("auto")
