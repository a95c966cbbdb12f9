#!/usr/bin/env bash
# GPU validation suite (bench/launch/gpu_suite.py) on a machine without network access:
#   bash bench/launch/gpu_suite.sh [OUT_DIR] [gpu_suite key=value options]
#   bash bench/launch/gpu_suite.sh --list      # the entries and their commands, nothing run (= dry_run=true)
#   bash bench/launch/gpu_suite.sh --help      # the options
# If hydra-core or tabulate is missing there, wheels in .whl/ (hydra-core, omegaconf, antlr4-python3-runtime,
# tabulate)
# are installed into /tmp/site first (see docs/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=gpu_suite_out
if [[ $# -gt 0 && $1 != -* && $1 != *=* ]]; then out=$1; shift; fi  # an option is never taken for OUT_DIR
args=()
for a in "$@"; do [[ $a == --list ]] && args+=(dry_run=true) || args+=("$a"); done
set -- "${args[@]+"${args[@]}"}"
if ! python3 -c "import hydra, tabulate" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "hydra-core/tabulate missing and no wheels in .whl/"; exit 2; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
python3 -m bench.launch.gpu_suite "out=$out" "$@"
