"""What produced a result: digests that tie each evaluation case to its model and settings.

A results folder outlives the run that wrote it. A case found there is reused only if the same
weights (values, dtype, config), the same method options, decoding options and the same prompt
token ids (task settings, tokenizer and chat template included) produced it; anything else is
a different case with a different id (see eval.results.CaseKey.setup).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

DIGEST_CHARS = 12  # hex characters kept: 48 bits, ample for the cases of one folder


def model_fingerprint(model) -> str:
  """SHA-256 of the model's config and every parameter's name, dtype, shape and bytes.

  Reads the weights once (about 1 GB/s of SHA-256 on a CPU core: 3 s for a 1.5B bf16 model), so
  two checkpoints differing in a single weight, or one loaded in another dtype, never share
  results.
  """
  digest = hashlib.sha256(repr(model.config).encode())
  for path, variable in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                               key=lambda item: tuple(map(str, item[0]))):
    value = variable.get_value()
    if isinstance(value, jax.Array) and not value.is_fully_addressable:  # multi-host meshes
      value = multihost_utils.process_allgather(value, tiled=True)
    value = np.asarray(jax.device_get(value))
    digest.update(f"{'.'.join(map(str, path))}:{value.dtype}:{value.shape}".encode())
    digest.update(np.ascontiguousarray(value).view(np.uint8).data)
  return digest.hexdigest()


def case_setup(model_id: str, method: Any, options: Any, prompt_ids: Sequence[int],
               max_new_tokens: int) -> str:
  """Short digest of everything besides the grid coordinates that produced one case."""
  record = {"model": model_id, "method": repr(method), "options": repr(options),
            "prompt": hashlib.sha256(np.asarray(prompt_ids, np.int64).tobytes()).hexdigest(),
            "max_new_tokens": int(max_new_tokens)}
  text = json.dumps(record, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]
