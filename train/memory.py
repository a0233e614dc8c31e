"""Device memory of one training step, estimated from abstract shapes (nothing is allocated).

The state part is exact: the trainable float32 master weights, the optimizer state
(``jax.eval_shape`` of the run's optax init), the float32 gradients, the frozen weights and
MAGE-FT's teacher weights, all from the ParamLayout built over ``nnx.eval_shape``. The
activation part is a model of what a remat step keeps live (docs/training.md, "Memory plan"),
an estimate to check against benchmarks/train_step.py's measured peaks:

* residuals: each layer's input, [views x batch x 2L, hidden] (views: those in one pass) in
  the model dtype (remat keeps only these; without remat every layer's projections and MLP
  activations stay too);
* one layer's recompute: the MLP's [rows, intermediate] tensors, ~4 live (gate, up, their
  product, its gradient);
* MAGE-FT's sparse student attention (every sparse layer in turn): float32 logits,
  probabilities and their gradient [views x batch x L, heads, budget + block] and the gathered
  keys and values [blocks, kv_heads, budget, head_dim];
* the LM head + loss chunk: ``loss_chunk`` x vocab float32 tensors, ~3 (CE) or ~5 (CE + KL);
* MAGE-FT's selection loss, when ``mage.selection_weight`` > 0: the student's All-[MASK] pass
  (what a layer keeps, as for the residuals, for [batch x 2L] rows: once per sequence), the
  teacher's noisy queries and both halves' keys of every sparse layer for every view (model
  dtype: the target, computed before the views split), and one layer's divergence chunk: ~3
  float32 [rows, L, heads, score_chunk] tensors (logits, log-probabilities, their gradient)
  for the student's and the target's rows.

  python -m train.memory --models=fast_dllm_v2_7b --trainable=lora,attention --seq_lens=32768
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from mage_jax.config import ModelConfig
from train import trainer
from train.config import TrainConfig

H100_BYTES = 80 * 10**9  # the H100 SXM's 80 GB (79.6 GiB usable)


def _bytes(tree: Any) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def state_bytes(cfg: TrainConfig, model_cfg: ModelConfig, mode: str) -> dict[str, int]:
  """Bytes of every part of the training state, from abstract shapes."""
  layout = trainer.ParamLayout(model_cfg, cfg.trainable, cfg.lora)
  tx, _ = trainer.make_optimizer(cfg.optim, cfg.steps)
  abstract = jax.eval_shape(lambda: trainer.initial_state(layout.abstract_params(), tx, 0))
  frozen = layout.abstract_frozen(mode)
  master = _bytes(abstract.params)
  itemsize = jnp.dtype(model_cfg.dtype).itemsize
  return {
      "trainable_params": sum(math.prod(x.shape) for x in abstract.params.values()),
      "master_f32": master,
      "optimizer": _bytes(abstract.opt_state),
      # the micro-batch scan carries a float32 sum beside each micro-batch's gradients
      "gradients_f32": master * (2 if cfg.optim.grad_accum > 1 else 1),
      "forward_copy": master // 4 * itemsize,  # the trainable weights cast for the forward
      "frozen": _bytes(frozen.shared),
      "teacher": _bytes(frozen.teacher),
  }


def activation_bytes(cfg: TrainConfig, model_cfg: ModelConfig, mode: str) -> dict[str, int]:
  """Bytes of the activations a step keeps live at its peak (the model in the docstring)."""
  m = model_cfg
  itemsize = jnp.dtype(m.dtype).itemsize
  views = 2 if cfg.complementary and not cfg.split_views else 1  # views in one pass
  rows = views * cfg.optim.batch_size * 2 * cfg.seq_len  # the doubled [x_t | x_0] sequence
  per_layer = m.hidden_size
  if not cfg.remat:  # what a layer's backward reads: norms, q/k/v/o, the MLP's activations
    per_layer = (4 * m.hidden_size + 2 * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
                 + 4 * m.intermediate_size)
  parts = {
      "residuals": rows * per_layer * itemsize * m.num_layers,
      "layer_recompute": rows * m.intermediate_size * itemsize * 4,
      "sparse_attention": 0,
      "lm_head_chunk": cfg.loss_chunk * m.vocab_size * 4 * (5 if mode == "selfdistill" else 3),
      "selection_loss": 0,
  }
  if mode == "selfdistill":
    noisy_rows = views * cfg.optim.batch_size * cfg.seq_len
    keys = min(cfg.mage.budget, cfg.seq_len) + m.block_size
    blocks = noisy_rows // m.block_size
    parts["sparse_attention"] = (3 * noisy_rows * m.num_heads * keys * 4 + 2 * blocks
                                 * m.num_kv_heads * cfg.mage.budget * m.head_dim * itemsize)
    if cfg.mage.selection_weight > 0:
      parts["selection_loss"] = _selection_loss_bytes(cfg, m, views, per_layer)
  return parts


def _selection_loss_bytes(cfg: TrainConfig, m: ModelConfig, views: int, per_layer: int) -> int:
  itemsize = jnp.dtype(m.dtype).itemsize
  batch, seq = cfg.optim.batch_size, cfg.seq_len
  student = batch * 2 * seq * per_layer * itemsize * m.num_layers
  target_rows = (2 if cfg.complementary else 1) * batch * seq  # made before the views split
  target = ((m.num_layers - cfg.mage.dense_layers) * target_rows
            * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim * itemsize)
  chunk = 3 * (target_rows + batch * seq) * m.num_heads * min(cfg.mage.score_chunk, seq) * 4
  return student + target + chunk


def plan(cfg: TrainConfig, model_cfg: ModelConfig, mode: str) -> dict[str, int]:
  """state_bytes and activation_bytes together, with their ``total``."""
  parts = {**state_bytes(cfg, model_cfg, mode), **activation_bytes(cfg, model_cfg, mode)}
  parts["total"] = sum(v for k, v in parts.items() if k != "trainable_params")
  return parts


def benchmark_config(model: str, trainable: str, seq_len: int, *, lora_rank: int = 64,
                     budget: int = 512, dense_layers: int = 2, complementary: bool = True,
                     split_views: bool = False, loss_chunk: int = 1024,
                     selection_weight: float = 0.0, workdir: str = "/tmp/unused") -> TrainConfig:
  """The training config benchmarks/train_step.py measures: batch 1, one micro-batch, remat,
  MAGE-FT; LoRA adapters of ``lora_rank`` (alpha 2 x rank) on q/k/v/o. Lengths past the
  preset's max_position_embeddings raise it (random weights: nothing was trained on it)."""
  from train import config as config_lib  # pylint: disable=import-outside-toplevel
  raw = {"model": model, "workdir": workdir, "steps": 1000, "seq_len": seq_len,
         "complementary": complementary, "split_views": split_views, "loss_chunk": loss_chunk,
         "trainable": trainable,
         "optim": {"batch_size": 1, "grad_accum": 1},
         "mage": {"budget": budget, "dense_layers": dense_layers,
                  "selection_weight": selection_weight}}
  if trainable == "lora":
    raw["lora"] = {"rank": lora_rank, "alpha": 2 * lora_rank}
  if seq_len > ModelConfig.preset(model).max_position_embeddings:
    raw["model_overrides"] = {"max_position_embeddings": seq_len}
  return config_lib.from_dict(raw)


def table(rows: list[tuple[str, str, int, dict[str, int]]]) -> str:
  """Markdown: one row per (model, trainable, L) plan, in GB (10^9 bytes)."""
  gb = lambda x: f"{x / 1e9:.1f}"
  lines = ["| model | trainable | L | trainable params | master + Adam + grads | forward copy | "
           "frozen | teacher | activations | total | fits 80 GB |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for model, trainable, seq_len, p in rows:
    state = p["master_f32"] + p["optimizer"] + p["gradients_f32"]
    activations = sum(p[k] for k in ("residuals", "layer_recompute", "sparse_attention",
                                     "lm_head_chunk", "selection_loss"))
    lines.append(f"| {model} | {trainable} | {seq_len // 1024}K | {p['trainable_params']:.4g} | "
                 f"{gb(state)} | {gb(p['forward_copy'])} | {gb(p['frozen'])} | "
                 f"{gb(p['teacher'])} | {gb(activations)} | {gb(p['total'])} | "
                 f"{'yes' if p['total'] <= H100_BYTES else 'no'} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="fast_dllm_v2_1.5b,fast_dllm_v2_7b")
  parser.add_argument("--trainable", default="all,attention,lora")
  parser.add_argument("--seq_lens", default="16384,32768")
  parser.add_argument("--lora_rank", type=int, default=64)
  parser.add_argument("--budget", type=int, default=512)
  parser.add_argument("--split_views", action="store_true",
                      help="the complementary views as two passes")
  parser.add_argument("--selection_weight", type=float, default=0.0,
                      help="> 0 adds MAGE-FT's selection loss")
  args = parser.parse_args(argv)
  rows = []
  for model in args.models.split(","):
    model_cfg = ModelConfig.preset(model)
    for trainable in args.trainable.split(","):
      for seq_len in map(int, args.seq_lens.split(",")):
        cfg = benchmark_config(model, trainable, seq_len, lora_rank=args.lora_rank,
                               budget=args.budget, split_views=args.split_views,
                               selection_weight=args.selection_weight)
        rows.append((model, trainable, seq_len, plan(cfg, model_cfg, "selfdistill")))
  print(table(rows))


if __name__ == "__main__":
  main()
