"""Training data: tokenized documents packed into fixed-length sequences, addressed by index.

Sequence i of a run is a pure function of (data seed, i): the mixture picks its source from a
generator seeded with (seed, i), a synthetic source generates its documents from task seeds
derived from i, and a file source reads chunk i of a seeded per-epoch permutation of its token
stream. So the data position of a checkpoint is just the number of sequences consumed, and a
resumed run sees exactly the sequences an uninterrupted one would.

Seed rule: synthetic training samples use task seed ``TRAIN_SEED_OFFSET + data.seed`` (>= 10**6)
with index ``i * DOCS_PER_SEQUENCE + j``; eval draws seeds below 10**6, so training never sees an
eval sample.
"""

from __future__ import annotations

import collections
import json
import math
import multiprocessing
import os
import queue
import random
import threading
from typing import Iterator, Sequence

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from mage_jax.config import ModelConfig
from mage_jax.tasks import haystack, niah, ruler
from mage_jax.tasks import sample as sample_lib
from train.config import TRAIN_SEED_OFFSET, ConfigError, DataConfig, SourceConfig

TOKENIZER_FILE = "tokenizer.json"
# Documents a synthetic sequence may draw before it is full: far above what packing needs
# (each document is about a sequence long), and the stride of the per-sequence task indices.
DOCS_PER_SEQUENCE = 1024
# Room left after a synthetic prompt for its answer and EOS when context_tokens is not set.
ANSWER_ROOM = 32
# niah_drill: prompt tokens per needle at most (a needle is ~17 tokens; the rest is filler).
NEEDLE_SPACING = 64


def _special_tokens(cfg: ModelConfig) -> list[str]:
  """Special tokens in id order, so the word-level vocabulary puts them at the model's ids."""
  roles = {cfg.pad_token_id: "[PAD]", cfg.mask_token_id: "[MASK]"}
  roles.setdefault(cfg.eos_token_ids[0], "[EOS]")
  size = max(roles) + 1
  if size > 64:
    raise ConfigError(f"data.tokenizer: a word-level tokenizer needs special ids < 64, the model "
                      f"has {sorted(roles)}; pass a tokenizer.json instead")
  names = [roles.get(i, f"[RESERVED_{i}]") for i in range(size)]
  free = [i for i in range(size) if i not in roles]
  if free:
    names[free[0]] = "[UNK]"
  else:
    names.append("[UNK]")
  return names


def number_tokens(digits_per_token: int) -> list[str]:
  """Every digit string of 1 to ``digits_per_token`` digits, shortest first."""
  return [str(n).zfill(width) for width in range(1, digits_per_token + 1)
          for n in range(10**width)]


def build_word_tokenizer(cfg: ModelConfig, texts: Sequence[str],
                         digits_per_token: int = 1) -> tokenizers.Tokenizer:
  """A word-level tokenizer with the model's vocab size and its pad / EOS / mask ids.

  Words carry their leading space as "▁" (Metaspace, as SentencePiece does) and punctuation and
  digits are tokens of their own, in groups of up to ``digits_per_token`` digits split left to
  right ("8737866" -> 8 7 3 7 8 6 6 at 1, as Qwen's tokenizer does; 873 786 6 at 3, as GPT-4's
  cl100k does). At 2-3 every digit group is in the vocabulary, so any number encodes without
  [UNK]; at 1 the ten digits come from ``texts`` like words (every recipe text has them), which
  keeps the shipped vocabulary's ids. Decoding restores the text exactly ("is 7654321."
  round-trips; joining word-level tokens with spaces would give "7 6 5 4 3 2 1 ."). Runs of
  capitals are split into letters too ("VAR QWERT" -> V A R Q W E R T), so RULER's random
  upper-case variable names are spelled out instead of becoming [UNK]; capitalised words
  ("The") stay whole. Runs of newlines are tokens of their own ("\n\nWhat" -> "\n\n", "What";
  glued together, each paragraph's first word would be a rare token of its own, mostly
  [UNK]). The most frequent other words of ``texts`` fill the rest of the vocabulary; words
  beyond it become [UNK].
  """
  if digits_per_token == 1:
    split_digits = pre_tokenizers.Digits(individual_digits=True)
  else:
    split_digits = pre_tokenizers.Split(Regex(rf"\d{{1,{digits_per_token}}}"),
                                        behavior="isolated")
  tokenizer = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
      pre_tokenizers.Punctuation(),
      pre_tokenizers.Split(Regex("\n+"), behavior="isolated"),
      split_digits,
      pre_tokenizers.Split(Regex("[A-Z](?=[A-Z])|(?<=[A-Z])[A-Z]"), behavior="isolated")])
  tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
  specials = _special_tokens(cfg)
  numbers = number_tokens(digits_per_token) if digits_per_token > 1 else []
  if len(specials) + len(numbers) >= cfg.vocab_size:
    raise ConfigError(f"model vocab_size={cfg.vocab_size} leaves no room for words after "
                      f"{len(specials)} special tokens and {len(numbers)} number tokens "
                      f"(data.digits_per_token={digits_per_token})")
  trainer = trainers.WordLevelTrainer(vocab_size=cfg.vocab_size, special_tokens=specials,
                                      show_progress=False)
  tokenizer.train_from_iterator(texts, trainer)
  if numbers:  # Specials at their ids, then every digit group, then the most frequent words.
    learned = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    words = [w for w, _ in learned[len(specials):] if not w.isdigit()]
    ordered = (specials + numbers + words)[:cfg.vocab_size]
    tokenizer.model = models.WordLevel({w: i for i, w in enumerate(ordered)}, unk_token="[UNK]")
  return tokenizer


def _read_documents(path: str) -> list[str]:
  """A .jsonl file's ``text`` fields, or a text file's blank-line separated paragraphs."""
  try:
    with open(path, encoding="utf-8") as f:
      content = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"data.sources.paths: cannot read {path}: {e}") from e
  if path.endswith(".jsonl"):
    docs = []
    for n, line in enumerate(content.splitlines(), 1):
      if not line.strip():
        continue
      try:
        docs.append(json.loads(line)["text"])
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}:{n}: expected a JSON object with a 'text' field ({e})") from e
  else:
    docs = [p.strip() for p in content.split("\n\n") if p.strip()]
  if not docs:
    raise ConfigError(f"data.sources.paths: {path} holds no documents")
  return docs


class _Synthetic:
  """Prompt + answer documents of one synthetic task, generated on demand."""

  def __init__(self, source: SourceConfig, seed: int, seq_len: int, count_tokens):
    self.kind = source.kind
    self.needles = source.needles
    self.number_share = source.number_share
    self.number_digits = source.number_digits
    self.value_digits = tuple(source.value_digits)
    self.zero_depth_share = source.zero_depth_share
    self.context = source.context_tokens or max(1, seq_len - ANSWER_ROOM)
    self.min_context = source.min_context_tokens or self.context
    self.seed = TRAIN_SEED_OFFSET + seed
    self.count_tokens = count_tokens

  def context_length(self, index: int) -> int:
    """The document's prompt length: ``context``, or log-uniform in [min_context, context]."""
    if self.min_context >= self.context:
      return self.context
    u = random.Random(f"train-length/{self.seed}/{index}").random()
    lo, hi = math.log(self.min_context), math.log(self.context)
    return int(round(math.exp(lo + u * (hi - lo))))

  def max_needles(self, context: int) -> int:
    """niah_drill: at most one needle per NEEDLE_SPACING prompt tokens, and ``needles``."""
    return max(1, min(self.needles, context // NEEDLE_SPACING))

  def text(self, index: int, context: int | None = None, needles: int | None = None) -> str:
    """Document ``index`` (prompt + answers), at its own length unless ``context`` is given
    (and, for niah_drill, with its own needle count unless ``needles`` is given)."""
    context = self.context_length(index) if context is None else context
    if self.kind == "repeat":
      return haystack.repeated_passage(context, seed=self.seed, index=index,
                                       count_tokens=self.count_tokens,
                                       number_share=self.number_share,
                                       number_digits=self.number_digits)
    if self.kind == "niah_drill":
      if needles is None:
        needles = random.Random(f"train-needles/{self.seed}/{index}").randint(
            1, self.max_needles(context))
      return niah.recall_drill_text(context, needles, seed=self.seed, index=index,
                                    count_tokens=self.count_tokens,
                                    value_digits=self.value_digits)
    if self.kind == "niah":
      rng = random.Random(f"train-depth/{self.seed}/{index}")
      depth = rng.random()
      if self.zero_depth_share and rng.random() < self.zero_depth_share:
        depth = 0.0
      sample = niah.niah_sample(context, depth, seed=self.seed, index=index,
                                count_tokens=self.count_tokens)
    else:
      sample = ruler.RULER_TASKS[self.kind](context, seed=self.seed, index=index,
                                            count_tokens=self.count_tokens)
    return f"{sample.prompt()} {', '.join(sample.answers)}."


class PackedData:
  """The run's sequences: ``sequence(i)`` int32 [seq_len], ``batch(step)`` [accum, micro, L]."""

  def __init__(self, cfg: DataConfig, model_cfg: ModelConfig, seq_len: int,
               tokenizer: tokenizers.Tokenizer):
    self.cfg, self.model_cfg, self.seq_len, self.tokenizer = cfg, model_cfg, seq_len, tokenizer
    self.eos = model_cfg.eos_token_ids[0]
    weights = np.array([s.weight for s in cfg.sources], np.float64)
    self.weights = weights / weights.sum()
    self.sources = []
    for source in cfg.sources:
      if source.kind == "files":
        docs = [d for p in source.paths for d in _read_documents(p)]
        stream = np.concatenate([self._encode(d) for d in docs])
        if len(stream) < seq_len:
          raise ConfigError(f"data.sources.paths: {len(stream)} tokens in "
                            f"{', '.join(source.paths)}, fewer than seq_len={seq_len}")
        self.sources.append(stream)
      else:
        synthetic = _Synthetic(source, cfg.seed, seq_len, self._count)
        for length in sorted({synthetic.min_context, synthetic.context}):
          try:
            synthetic.text(0, length, needles=synthetic.max_needles(length))
          except ValueError as e:
            raise ConfigError(f"data.sources: {source.kind} at {length} tokens: {e}")
        self.sources.append(synthetic)

  def _count(self, text: str) -> int:
    return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

  def _encode(self, text: str) -> np.ndarray:
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    return np.asarray(ids + [self.eos], np.int32)

  def sequence(self, i: int) -> np.ndarray:
    """Packed sequence number ``i`` (documents joined by EOS, the last one cut)."""
    choice = np.random.default_rng([self.cfg.seed, i]).choice(len(self.sources), p=self.weights)
    source = self.sources[choice]
    if isinstance(source, np.ndarray):
      chunks = len(source) // self.seq_len
      epoch, slot = divmod(i, chunks)
      chunk = np.random.default_rng([self.cfg.seed, choice, epoch]).permutation(chunks)[slot]
      return source[chunk * self.seq_len:(chunk + 1) * self.seq_len]
    parts, filled = [], 0
    for j in range(DOCS_PER_SEQUENCE):
      parts.append(self._encode(source.text(i * DOCS_PER_SEQUENCE + j)))
      filled += len(parts[-1])
      if filled >= self.seq_len:
        return np.concatenate(parts)[:self.seq_len]
    raise RuntimeError(f"{DOCS_PER_SEQUENCE} documents did not fill {self.seq_len} tokens")

  def batch(self, step: int, micro_batch: int, accum: int) -> np.ndarray:
    """Sequences [step * G, (step + 1) * G) for G = accum * micro_batch, as [accum, micro, L]."""
    size = micro_batch * accum
    rows = [self.sequence(step * size + r) for r in range(size)]
    return np.stack(rows).reshape(accum, micro_batch, self.seq_len)


def prefetch_batches(data: PackedData, steps: range, micro_batch: int, accum: int, *,
                     depth: int = 4, workers: int = 0) -> Iterator[np.ndarray]:
  """``data.batch(step, ...)`` for every step of ``steps``, built ahead of the consumer.

  Building a batch is host work (task generation, tokenisation) that would otherwise stall the
  device between steps. With ``workers`` = 0 one background thread builds ``depth`` batches
  ahead; with ``workers`` > 0 that many processes do, ``2 * workers`` batches ahead (the GIL
  would serialise threads). Batches depend only on the step number, so prefetching changes
  nothing in what is trained on (resume stays exact). An error while building a batch is raised
  here, at the step it belongs to; closing the iterator early stops the producers.
  """
  if workers > 0:
    return _prefetch_in_processes(data, steps, micro_batch, accum, workers)
  return _prefetch_in_thread(data, steps, micro_batch, accum, depth)


def _prefetch_in_thread(data: PackedData, steps: range, micro_batch: int, accum: int,
                        depth: int) -> Iterator[np.ndarray]:
  slots: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def produce():
    for step in steps:
      try:
        item = (data.batch(step, micro_batch, accum), None)
      except Exception as e:  # handed to the consumer, which raises it in order
        item = (None, e)
      while not stop.is_set():
        try:
          slots.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if stop.is_set() or item[1] is not None:
        return

  thread = threading.Thread(target=produce, name="prefetch_batches", daemon=True)
  thread.start()
  try:
    for _ in steps:
      batch, error = slots.get()
      if error is not None:
        raise error
      yield batch
  finally:
    stop.set()
    thread.join()


# The PackedData of a batch-building worker process, built once by _init_worker.
_WORKER_DATA: PackedData | None = None


def _init_worker(cfg: DataConfig, model_cfg: ModelConfig, seq_len: int,
                 tokenizer_json: str) -> None:
  global _WORKER_DATA
  _WORKER_DATA = PackedData(cfg, model_cfg, seq_len,
                            tokenizers.Tokenizer.from_str(tokenizer_json))


def _worker_batch(step: int, micro_batch: int, accum: int) -> np.ndarray:
  return _WORKER_DATA.batch(step, micro_batch, accum)


def _prefetch_in_processes(data: PackedData, steps: range, micro_batch: int, accum: int,
                           workers: int) -> Iterator[np.ndarray]:
  # spawn, not fork: the parent runs JAX (and tokenizers' thread pool), neither fork-safe.
  context = multiprocessing.get_context("spawn")
  pool = context.Pool(workers, initializer=_init_worker,
                      initargs=(data.cfg, data.model_cfg, data.seq_len, data.tokenizer.to_str()))
  pending: collections.deque = collections.deque()
  upcoming = iter(steps)
  try:
    for _ in steps:
      while len(pending) < 2 * workers:
        step = next(upcoming, None)
        if step is None:
          break
        pending.append(pool.apply_async(_worker_batch, (step, micro_batch, accum)))
      yield pending.popleft().get()
  finally:
    pool.terminate()
    pool.join()


def _vocabulary_texts(cfg: DataConfig, seq_len: int) -> list[str]:
  """Documents to train the word-level vocabulary on (lengths counted in words)."""
  texts = []
  for source in cfg.vocab_sources or cfg.sources:
    if source.kind == "files":
      texts += [d for p in source.paths for d in _read_documents(p)][:cfg.word_vocab_docs]
    else:
      synthetic = _Synthetic(source, cfg.seed, seq_len, sample_lib.count_words)
      try:
        texts += [synthetic.text(i) for i in range(cfg.word_vocab_docs)]
      except ValueError as e:
        raise ConfigError(f"data.sources: {source.kind} at {synthetic.context} words: {e}")
  return texts


def load_tokenizer(cfg: DataConfig, model_cfg: ModelConfig, seq_len: int,
                   workdir: str) -> tokenizers.Tokenizer:
  """The run's tokenizer, stored in ``workdir`` on first use so a resume reuses it as is."""
  saved = os.path.join(workdir, TOKENIZER_FILE)
  path = saved if os.path.exists(saved) else (None if cfg.tokenizer == "word" else cfg.tokenizer)
  if path is not None:
    try:
      tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on a bad file.
      raise ConfigError(f"data.tokenizer: cannot load {path}: {e}") from e
  else:
    tokenizer = build_word_tokenizer(model_cfg, _vocabulary_texts(cfg, seq_len),
                                     cfg.digits_per_token)
  if tokenizer.get_vocab_size() > model_cfg.vocab_size:
    raise ConfigError(f"data.tokenizer: {tokenizer.get_vocab_size()} tokens exceed the model's "
                      f"vocab_size={model_cfg.vocab_size}")
  os.makedirs(workdir, exist_ok=True)
  if not os.path.exists(saved):
    tokenizer.save(saved)
  return tokenizer
