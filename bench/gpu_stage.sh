#!/usr/bin/env bash
# Stage, on this machine (it has pip's index), every package the offline GPU machine lacks for
# bench/gpu_check.sh, as git-ignored folders the device tool carries one per `run` (64 MiB each):
#   .gwtrain   trl, datasets, deepspeed (sdist), liger-kernel, pydantic: the first call's
#              training benchmark needs nothing else (../shared/tools/gpu-wheels.sh train)
#   .gw1 ...   Ray 2.60 + vLLM 0.24.0 and what it imports (gpu-wheels.sh vllm); the last one
#              also holds what our own stages import that the image lacks: math-verify and its
#              LaTeX parser (verify / evaluate), DuckDB and uvicorn are not needed there.
# Run it from the repository root of the checkout the device tool sends (not a worktree:
# gpu-wheels.sh writes .git/info/exclude). docs/gpu.md has the call order.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
tools=${GPU_WHEELS:-../shared/tools/gpu-wheels.sh}
[ -d .git ] || { echo "gpu_stage.sh: run it in the main checkout (.git is not a folder here)" >&2; exit 2; }

bash "$tools" train >/dev/null
rm -rf .gwtrain && mv .gw1 .gwtrain
grep -qx "/.gwtrain/" .git/info/exclude || echo "/.gwtrain/" >> .git/info/exclude

bash "$tools" vllm
last=$(ls -d .gw[0-9]* | sort -V | tail -1)
# The versions our pyproject pins / resolves here (math-verify 0.9.0 -> latex2sympy2_extended
# 1.11.0 -> antlr4 4.13.2; sympy is in the image).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform any -d "$last" \
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 2>&1 \
  | grep -v "^WARNING: Location" || true
du -sh .gwtrain .gw[0-9]* | sort -V -k2
echo "carry .gwtrain in the first run, then each .gwN in its own run, back to back (docs/gpu.md)"
