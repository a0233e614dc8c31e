#!/bin/bash
# One call of a long-context stage on the GPU machine (one 10-minute command): a time-boxed
# training segment from exported weights, its export in shards under 16 MB, exact NIAH at the
# given lengths, and at most 5 files back in $OUT.
#
#   bash configs/train/long_context/device_stage.sh STAGE INIT_MODEL_DIR MINUTES EVAL_LENGTHS \
#       N_PROMPTS [STEPS_DONE]
#
#   STAGE           l1_8k, l2_16k, l3_32k (configs/train/long_context/STAGE.json) or a config path
#                   (paths are relative to the repository root, where the script runs)
#   INIT_MODEL_DIR  Hugging Face directory the segment starts from (models/default for l1's
#                   first segment; else the previous segment's or stage's returned model)
#   MINUTES         training time box, compilation included (leave ~1.5 min for start-up and
#                   export, plus the eval's time, inside the command's 10 minutes)
#   EVAL_LENGTHS    comma list of NIAH context lengths for exact attention (2048,8192), or "none"
#   N_PROMPTS       NIAH prompts per length, rounded up to a multiple of 5 (depths 0, .25, .5,
#                   .75, 1)
#   STEPS_DONE      steps the stage's earlier segments ran (progress.json's steps_done), default 0
#
# Every call trains, exports and evaluates in a fresh folder runs/long_context/STAGE/<time>-<pid>
# (a reused eval folder would resume, i.e. report, old results). $OUT (required) receives
#   $OUT/STAGE/model-0000i-of-0000n.safetensors   the weight shards (at most 4)
#   $OUT/STAGE/run.tar.gz                         model/{config.json, index, tokenizer.json},
#                                                 run/{progress.json, metrics.jsonl, train.log,
#                                                 eval.log, eval/ (results, summary)}
# Unpack into a model directory:  tar -xzf .../STAGE/run.tar.gz -C DEST &&
#                                 cp .../STAGE/model-*.safetensors DEST/model/
# Optimizer state does not survive a call (configs/train/long_context/stage.py says why and how
# a later segment continues the stage's learning-rate schedule). Env: MODE (pretrain, the
# default, or selfdistill: a MAGE-FT config such as ft_mage_16k), PYTHON (default python3),
# EVAL_BATCH (prompts decoded together, default 25), MAX_FILE_BYTES (default 16 MiB), RUNS_DIR
# (default runs/long_context).
set -euo pipefail
if [ $# -lt 5 ] || [ $# -gt 6 ]; then
  echo "usage: $0 STAGE INIT_MODEL_DIR MINUTES EVAL_LENGTHS N_PROMPTS [STEPS_DONE]" >&2
  exit 2
fi
stage_arg=$1 init=$2 minutes=$3 eval_lengths=$4 n_prompts=$5 steps_done=${6:-0}
cd "$(dirname "$0")/../../.."
python=${PYTHON:-python3}
mode=${MODE:-pretrain}
eval_batch=${EVAL_BATCH:-25}
max_file_bytes=${MAX_FILE_BYTES:-16777216}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
fail() { echo "device_stage: error: $*" >&2; exit 2; }

[ -n "${OUT:-}" ] || fail "OUT is not set (the folder whose files come back from the machine)"
case $stage_arg in
  *.json) config=$stage_arg ;;
  *) config=configs/train/long_context/$stage_arg.json ;;
esac
[ -f "$config" ] || fail "STAGE: no config $config"
stage=$(basename "$config" .json)
[ -d "$init" ] || fail "INIT_MODEL_DIR: $init is not a directory"
[[ $mode == pretrain || $mode == selfdistill ]] ||
  fail "MODE: expected pretrain or selfdistill, got $mode"
[[ $n_prompts =~ ^[1-9][0-9]*$ ]] || fail "N_PROMPTS: expected a positive integer, got $n_prompts"
[[ $eval_lengths == none || $eval_lengths =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] ||
  fail "EVAL_LENGTHS: expected a comma list of token counts or none, got $eval_lengths"

run=${RUNS_DIR:-runs/long_context}/$stage/$(date -u +%Y%m%dT%H%M%SZ)-$$
[ ! -e "$run" ] || fail "run folder $run exists already"
mkdir -p "$run/run"
echo "device_stage: $stage ($mode) from $init, $minutes min, steps done $steps_done -> $run"

"$python" -m configs.train.long_context.stage --config="$config" --init="$init" \
  --minutes="$minutes" --steps_done="$steps_done" --run_dir="$run/segment" --mode="$mode" \
  2>&1 | tee "$run/run/train.log"
cp "$run/segment/progress.json" "$run/segment/train/metrics.jsonl" "$run/run/"

# What comes back: the shards as they are, everything else in one tar.gz; packed before the
# eval too, so a command killed at its time limit during the eval still returns the weights.
pack() {
  rm -rf "$run/pack" && mkdir -p "$run/pack/model" "$OUT/$stage"
  local file size shards=("$model"/*.safetensors)
  [ ${#shards[@]} -le 4 ] || fail "${#shards[@]} weight files in $model (at most 4 come back)"
  for file in "${shards[@]}"; do
    size=$(stat -c %s "$file")
    [ "$size" -le "$max_file_bytes" ] || fail "$file has $size bytes, above $max_file_bytes"
    cp "$file" "$OUT/$stage/"
  done
  for file in "$model"/*; do
    case $file in *.safetensors) ;; *) cp "$file" "$run/pack/model/" ;; esac
  done
  cp -r "$run/run" "$run/pack/run"
  tar -czf "$OUT/$stage/run.tar.gz" -C "$run/pack" model run
  size=$(stat -c %s "$OUT/$stage/run.tar.gz")
  [ "$size" -le "$max_file_bytes" ] || fail "run.tar.gz has $size bytes, above $max_file_bytes"
}
model=$run/segment/model
pack

if [ "$eval_lengths" != none ]; then
  samples=$(( (n_prompts + 4) / 5 ))
  # A fresh output folder: eval resumes (skips) whatever results.jsonl it finds.
  "$python" -m eval --method=exact --task=niah --checkpoint="$model" \
    --context_lengths="$eval_lengths" --num_samples="$samples" --batch_size="$eval_batch" \
    --measure=accuracy --output_dir="$run/run/eval" 2>&1 | tee "$run/run/eval.log" ||
    echo "device_stage: the eval failed (run/eval.log); the weights come back all the same"
  pack
fi

echo "device_stage: back in \$OUT/$stage: $(ls "$OUT/$stage" | tr '\n' ' ')"
"$python" -c 'import json, sys; r = json.load(open(sys.argv[1])); r.pop("train_config")
print(json.dumps(r))' "$run/run/progress.json"
