#!/usr/bin/env bash
# TPU pod slice: run the SAME command on every worker; JAX discovers the slice (coordinator,
# process count and id come from the TPU metadata server), so no addresses are needed.
#
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
#     "cd ~/paretoq_jax && launch/tpu_pod.sh configs/llama-3.2-1b-2bit.yaml run_dir=gs://BUCKET/run1"
#
# run_dir must be visible to every worker (a GCS bucket or a shared filesystem): Orbax writes
# each host's shards of the checkpoint there, and process 0 writes config.yaml / metrics.jsonl.
# Mesh: set mesh.fsdp (and mesh.tensor) so that data x fsdp x tensor = total chips; -1 fills.
# Plan it first on any Linux machine (compile-only; e.g. v5p-16 = topology v5p:2x2x2, the
# topology tests/test_plan.py compiles the 1B-class config for; docs/scale.md):
#   python -m paretoq_jax.plan --config configs/paper/llama-3.2-1b.yaml --topology v5p:2x2x2
set -euo pipefail
config=${1:?usage: launch/tpu_pod.sh CONFIG.yaml [key=value ...]}
shift
exec "${PYTHON:-python}" -m paretoq_jax.train --config "${config}" --distributed "$@"
