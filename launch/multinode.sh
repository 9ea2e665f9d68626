#!/usr/bin/env bash
# Multi-node: launch/multinode.sh CONFIG.yaml --nnodes N --endpoint HOST:PORT [--node-rank R] [--id ID] [-- GENERATE ARGS...]
# Run the same command on every node. The config's tensor x pipeline ranks are spread evenly over
# the N nodes (N must divide it); torchrun's c10d rendezvous at HOST:PORT (on node 0) joins them.
# --node-rank R pins this node's place (nodes hold consecutive global ranks: with tensor = ranks per
# node, each node is one pipeline stage); without it c10d assigns node ranks in arrival order.
set -euo pipefail
usage() { sed -n '2,6s/^# //p' "$0"; echo "env: PYTHON (default: the repo's .venv, else python3), OMP_NUM_THREADS"; }
[[ $# -ge 1 && $1 != -h && $1 != --help ]] || { usage; exit $(( $# == 0 ? 2 : 0 )); }
config=$1; shift
nnodes="" endpoint="" node_rank="" id="llama3_dist"
while [[ $# -gt 0 ]]; do
    case $1 in
        --nnodes) nnodes=$2; shift 2 ;;
        --endpoint) endpoint=$2; shift 2 ;;
        --node-rank) node_rank=$2; shift 2 ;;
        --id) id=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ -n $nnodes && -n $endpoint ]] || { echo "error: --nnodes and --endpoint are required (see --help)" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $root/.venv/bin/python ]]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
ranks=$("$PYTHON" -m llama3_dist world-size --config "$config")
if (( ranks % nnodes )); then
    echo "error: $ranks ranks (tensor x pipeline in $config) do not split evenly over $nnodes nodes" >&2; exit 2
fi
per_node=$(( ranks / nnodes ))
cores=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / per_node > 0 ? cores / per_node : 1 ))}
exec "$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$per_node" \
    --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "$id" ${node_rank:+--node-rank "$node_rank"} \
    -m llama3_dist generate --config "$config" "$@"
