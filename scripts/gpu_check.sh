#!/usr/bin/env bash
# GPU checks in one run: the gpu-marked tests, a short real training run (bf16, compiled step), training
# speed per precision, with torch.compile and with larger batches, and decoding speed.
# Figures go to OUT_DIR as JSON and logs; a summary is printed.
#
#   bash scripts/gpu_check.sh DATA_DIR MODEL_DIR OUT_DIR [PARTS]
#
# DATA_DIR holds Multi30k ({train,valid,test2016}.{de,en}); MODEL_DIR is a trained Multi30k model whose
# config.yaml reads DATA_DIR (decoding speed is measured on its test split). PARTS picks what to run
# (default: "tests run precisions compile batch decode"). EXPERIMENT picks the training experiment (default
# multi30k_gru, as the README's GPU figures; multi30k_gru_concat is the peers' decoder exactly).
set -u
DATA=${1:?data dir}; MODEL=${2:?model dir}; OUT=${3:?out dir}; PARTS=${4:-tests run precisions compile batch decode}
EXPERIMENT=${EXPERIMENT:-multi30k_gru}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
has() { [[ " $PARTS " == *" $1 "* ]]; }

train_speed() {  # NAME SECONDS OVERRIDES...
  local name=$1 seconds=$2; shift 2
  python3 scripts/benchmark.py --device cuda --threads 4 --train-seconds "$seconds" --out "$OUT/train_$name.json" \
    -- "experiment=$EXPERIMENT" "data.path=$DATA" "$@" 2>&1 | grep -E "^\| (training|peak|target)" | sed "s/^/$name /"
}

if has tests; then
  echo "== GPU tests"
  python3 -m pytest -q -p no:cacheprovider -rf --tb=line -m gpu tests/test_gpu.py 2>&1 | tail -12
fi
if has run; then
  echo "== a short real run (bf16, compiled step): loss falls, validation and test BLEU come out"
  python3 scripts/train.py "experiment=$EXPERIMENT" "data.path=$DATA" trainer.device=cuda trainer.precision=bf16 \
    trainer.compile=true trainer.max_minutes=1.2 trainer.valid_every=100000 trainer.threads=4 \
    hydra.run.dir=/tmp/gpu_check_run > "$OUT/run.log" 2>&1
  cp /tmp/gpu_check_run/summary.json "$OUT/run_summary.json"
  grep -E "step [0-9]+:|BLEU|Error" "$OUT/run.log" | tail -6
fi
if has precisions; then
  echo "== training speed (Multi30k, the peers' model, 4000-token batches)"
  for precision in fp32 bf16 fp16; do train_speed "$precision" 20 trainer.precision=$precision; done
fi
if has compile; then  # compilation takes the first 20-30 s; the median is over the steps after it
  echo "== training speed with trainer.compile=true"
  train_speed fp32_compiled 70 trainer.compile=true
fi
if has batch; then
  echo "== training speed with 16,000-token batches"
  train_speed fp32_16k 20 trainer.batch_tokens=16000
fi
if has decode; then
  echo "== decoding speed (test2016, 1,000 sentences)"
  python3 scripts/benchmark.py --device cuda --threads 4 --train-seconds 0 --model "$MODEL" --batch-sizes 64,256 \
    --beams 1,5 --decode-variants fp32,bf16 --out "$OUT/decode.json" 2>&1 | grep -E "^\| decoding"
fi
