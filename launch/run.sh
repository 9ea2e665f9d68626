#!/usr/bin/env bash
# Single node: launch/run.sh CONFIG.yaml [-- GENERATE ARGS...]
# Starts tensor x pipeline ranks (read from CONFIG) with torchrun and runs `llama3-dist generate` on them.
set -euo pipefail
usage() { sed -n '2,3s/^# //p' "$0"; echo "env: PYTHON (default: the repo's .venv, else python3), OMP_NUM_THREADS (default: cores / ranks)"; }
[[ $# -ge 1 && $1 != -h && $1 != --help ]] || { usage; exit $(( $# == 0 ? 2 : 0 )); }
config=$1; shift
[[ ${1:-} == -- ]] && shift
root=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $root/.venv/bin/python ]]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
ranks=$("$PYTHON" -m llama3_dist world-size --config "$config")
cores=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / ranks > 0 ? cores / ranks : 1 ))}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$ranks" \
    -m llama3_dist generate --config "$config" "$@"
