#!/usr/bin/env bash
# Issue 15's device checks as prepared commands, so a session lent a GPU spends its few minutes
# running them (docs/gpu.md: the call order, what each part measures, the time each may take).
# On the GPU machine, from the repository root (the device tool's working directory):
#   bash bench/gpu_check.sh train      # 1st call, carrying .gwtrain: SFT + REDI vs TRL benchmark
#   (then one call per .gwN:  mkdir -p /tmp/gw && cp -r .gwN/. /tmp/gw/)
#   bash bench/gpu_check.sh all        # the GPU tests + the provenance benchmark (~9 min)
#   bash bench/gpu_check.sh generate   # generate vs LLM.generate, 1 and 4 engines (~7 min)
#   bash bench/gpu_check.sh pipeline   # the demo's whole pipeline on CUDA, sft/redi on ZeRO-2
#   bash bench/gpu_check.sh zero3      # then sft, redi, evaluate again on ZeRO-3
#   bash bench/gpu_check.sh tests provenance   # or any parts, in the order given
# Here, on CPU: REHEARSE=1 bash bench/gpu_check.sh train all generate pipeline zero3
#   runs the same commands at toy sizes through .venv (no CUDA, the tiny model): the arguments,
#   paths and parsing of every part are checked before a device minute is spent.
# Every part writes $OUT/<part>.log (what comes back from the device: at most 8 files) and a line
# to $OUT/summary.txt; a part that fails or runs out of time does not stop the next one.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(all)
[ "${parts[*]}" = all ] && parts=(tests provenance)   # what fits one 600 s call
for part in "${parts[@]}"; do   # every name checked before anything is installed or started
  case $part in train|tests|provenance|generate|pipeline|zero3) ;;
  *) echo "gpu_check.sh: unknown part '$part' (train tests provenance generate pipeline zero3" \
          "all)" >&2; exit 2 ;;
  esac
done
if [ -z "${REHEARSE:-}" ] && ! nvidia-smi >/dev/null 2>&1; then
  # The device path installs into /tmp and stops every Ray on the machine between parts.
  echo "gpu_check.sh: no GPU here (nvidia-smi fails); on CPU run REHEARSE=1 bash $0 ..." >&2
  exit 2
fi

if [ -n "${REHEARSE:-}" ]; then
  PY=${PY:-$REPO/.venv/bin/python}
  export PYTHONPATH=$REPO
else
  # The first call installs the training wheels it carries; later calls every folder copied in.
  if [ -d .gwtrain ]; then mkdir -p /tmp/gw && cp -r .gwtrain/. /tmp/gw/; fi
  # Install once per set of folders (unpacking vLLM again costs each call half a minute).
  marker=/tmp/gpu-check-installed
  if [ "$(head -1 $marker 2>/dev/null)" != "$(ls /tmp/gw | md5sum)" ]; then
    exports=$(bash /tmp/gw/gpu-wheels.sh install) || exit 1
    { ls /tmp/gw | md5sum; echo "$exports"; } > $marker    # listed after the parts are joined
  fi
  eval "$(tail -1 $marker)"
  export PYTHONPATH=$REPO:$PYTHONPATH
  PY=python3
  # A random-init Qwen2.5-0.5B shape with our tokenizer (vocabulary padded to 151,936), built
  # once per machine: /tmp lives as long as the machine stays warm.
  M=/tmp/gpu-check-models/qwen2.5-0.5b
  [ -f $M/config.json ] || $PY -m pipeline.cli tiny-model $M --shape qwen2.5-0.5b >/dev/null
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step() {  # step NAME LIMIT_S COMMAND...: run it under a time limit, log it, never stop the script
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*" >> "$OUT/$name.log"
  timeout -k 15 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  local line="$name: rc $rc in $((SECONDS - t0)) s (limit $limit s)"
  [ $rc -eq 124 ] && line="$line TIMED OUT"
  echo "$line" | tee -a "$OUT/summary.txt"
  # A part killed at its limit can leave its local Ray (and an engine holding GPU memory)
  # behind; on the device nothing else runs, so the next part starts clean.
  if [ -z "${REHEARSE:-}" ]; then
    $PY -m ray.scripts.scripts stop --force >/dev/null 2>&1
    pkill -9 -f "VLLM::" 2>/dev/null   # a plain script's engine process (bench/generate.py (a))
  fi
  return 0
}

if [ -z "${REHEARSE:-}" ]; then
  { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, torch.cuda.get_device_name(0))"; } >> "$OUT/summary.txt" 2>&1
fi

for part in "${parts[@]}"; do
  case $part in
  train)  # sft >= 3x TRL SFTTrainer's best (packing bfd + liger); redi step <= 0.6x DPO's
    if [ -n "${REHEARSE:-}" ]; then
      step train 600 $PY bench/train.py --median 60 --cap 256 --tokens-per-step 1024 --steps 3 --rounds 1
    else
      step train 300 $PY bench/train.py --gpu --liger --model $M --median 1000 --cap 4096 \
        --tokens-per-step 16384 --steps 6 --rounds 1
    fi ;;
  tests)  # every gpu-marked test; the summary line goes into docs/performance.md
    if [ -n "${REHEARSE:-}" ]; then
      step tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py  # all skip on CPU
    else
      step tests 290 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
    fi ;;
  provenance)  # >= 2x the better of vLLM prompt_logprobs and a padded transformers forward
    if [ -n "${REHEARSE:-}" ]; then
      step provenance 600 $PY bench/provenance.py --traces 32 --median 40 --rounds 1 --threads 2
    else
      step provenance 240 $PY bench/provenance.py --gpu --model $M --median 1000 --cap 4096 \
        --traces 256 --tokens-per-row 32768 --batch 8 --rounds 2
    fi ;;
  generate)  # the stage >= 0.95x plain LLM.generate; 2-4 engines on the GPU >= 1.5x one
    if [ -n "${REHEARSE:-}" ]; then
      step generate 600 $PY bench/generate.py --problems 32 --max-tokens 16 --shard-size 8 --no-n8
    else
      # 512 prompts x n=4 x 512 tokens: ~1M output tokens, ~40 s at STACK.md's 27k tok/s
      step generate 540 $PY bench/generate.py --gpu --model $M --problems 512 \
        --max-tokens 512 --shard-size 128 --max-model-len 2048 --replicas 1,4 --no-n8
    fi ;;
  pipeline|zero3)  # every stage on CUDA: the demo's models and data (a random-init 0.5B model
    # writes no correct trace: sft would have nothing to train on), with resources for one GPU;
    # sft + redi under ZeRO-2, then (zero3, on the same warm machine) ZeRO-3: resources are not
    # in a version's hash, so a new sft seed makes sft, redi and evaluate run again.
    z=2; [ $part = zero3 ] && z=3
    items=(data_root=/tmp/gpu-check-data sft.seed=$z
           resources.generate.dtype=auto resources.prune.dtype=auto resources.evaluate.dtype=auto
           resources.generate.gpus_per_replica=0.5 resources.prune.gpus_per_replica=0.5
           resources.evaluate.gpus_per_replica=0.5 resources.provenance.replicas=1
           resources.provenance.gpus_per_replica=1
           resources.sft.num_workers=1 resources.sft.use_gpu=true resources.sft.zero_stage=$z
           resources.redi.num_workers=1 resources.redi.use_gpu=true resources.redi.zero_stage=$z)
    if [ -n "${REHEARSE:-}" ]; then   # parse + validate the recipe the demo would run
      step $part 120 $PY -c "import sys; from pipeline.apps import demo
r = demo.load('configs/tiny.yaml', demo.DEMO_OVERRIDES + sys.argv[1:] + ['teacher=t', 'student=s'])
print({s: vars(r.resources[s]) for s in ('generate', 'provenance', 'sft', 'redi')})" "${items[@]}"
    else
      step $part 540 $PY -m pipeline.cli demo "${items[@]}"
    fi ;;
  esac
done
cat "$OUT/summary.txt"
