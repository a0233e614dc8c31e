"""The shipped training recipe of the default model: every stage config loads, validates and
yields full training sequences with the shipped tokenizer (configs/train/default_model)."""

import glob
import json
import os

import numpy as np
import pytest
import tokenizers

from mage_jax import ModelConfig
from train import config as config_lib
from train import data as data_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "configs", "train", "default_model")
SHIPPED = os.path.join(ROOT, "models", "default")
STAGES = sorted(glob.glob(os.path.join(RECIPE, "*.json")))


def test_the_recipe_is_there():
  names = {os.path.basename(p) for p in STAGES}
  assert {"s1_ar128.json", "s6b_diffusion2048_numbers.json", "ft_mage.json"} <= names
  with open(os.path.join(RECIPE, "train.sh")) as f:
    script = f.read()
  for path in STAGES:  # every pretraining stage is run by train.sh (ft_*: MAGE-FT runs)
    name = os.path.basename(path)[:-len(".json")]
    assert name.startswith("ft_") or name in script, name


@pytest.mark.parametrize("path", STAGES, ids=os.path.basename)
def test_stage_config_validates_and_packs_sequences(path, tmp_path):
  cfg = config_lib.load_config(path, {"data.workers": 0})
  model_cfg = ModelConfig.from_json_file(os.path.join(SHIPPED, "config.json"),
                                         **dict(cfg.model_overrides))
  mode = "selfdistill" if os.path.basename(path).startswith("ft") else "pretrain"
  cfg.validate(model_cfg, mode)
  tokenizer = data_lib.load_tokenizer(
      config_lib.DataConfig(tokenizer=os.path.join(SHIPPED, "tokenizer.json")), model_cfg,
      cfg.seq_len, str(tmp_path))
  data = data_lib.PackedData(cfg.data, model_cfg, cfg.seq_len, tokenizer)
  rows = np.stack([data.sequence(i) for i in range(3)])
  assert rows.shape == (3, cfg.seq_len)
  assert np.mean(rows == tokenizer.token_to_id("[UNK]")) < 0.02
  for source in data.sources:  # every source can build a document at its shortest length
    source.text(0, context=source.min_context)


def test_stages_chain_through_their_exports():
  chain = {}
  for path in STAGES:
    with open(path) as f:
      raw = json.load(f)
    chain[raw.get("export_dir")] = os.path.basename(path)
  for path in STAGES:
    with open(path) as f:
      raw = json.load(f)
    model = raw["model"]
    assert model in ("tiny_qwen2", "models/default") or model in chain, (path, model)


def test_the_first_stage_rebuilds_the_shipped_vocabulary():
  cfg = config_lib.load_config(os.path.join(RECIPE, "s1_ar128.json"))
  assert cfg.data.tokenizer == "word" and cfg.data.vocab_sources
  model_cfg = ModelConfig.from_json_file(os.path.join(SHIPPED, "config.json"))
  built = data_lib.build_word_tokenizer(model_cfg,
                                        data_lib._vocabulary_texts(cfg.data, cfg.seq_len))
  shipped = tokenizers.Tokenizer.from_file(os.path.join(SHIPPED, "tokenizer.json"))
  assert built.get_vocab() == shipped.get_vocab()
