#!/usr/bin/env bash
# Several TPU slices (multi-slice): the data axis crosses slices over the data-center network
# (DCN), fsdp x tensor stay inside each slice on ICI (paretoq_jax.sharding.make_mesh).
# Run the SAME command on every worker of every slice, e.g. with queued resources:
#
#   gcloud compute tpus queued-resources create "$QR" --node-count 2 --node-prefix "$NAME" \
#     --accelerator-type v5p-8 --runtime-version v2-alpha-tpuv5 --zone "$ZONE"
#   gcloud compute tpus tpu-vm ssh "${NAME}-0" ... (and "${NAME}-1") --worker=all --command \
#     "cd ~/paretoq_jax && launch/tpu_multislice.sh configs/paper/llama-3.2-1b.yaml \
#      mesh.data=2 mesh.fsdp=-1 run_dir=gs://BUCKET/run1"
#
# The TPU runtime sets MEGASCALE_COORDINATOR_ADDRESS / MEGASCALE_NUM_SLICES / MEGASCALE_SLICE_ID
# on queued-resource and GKE JobSet slices; JAX finds the processes itself. mesh.data must be a
# multiple of the number of slices. Plan it first, on any Linux machine (compile-only, the same
# 2 x v5p-8 topology the tests compile):
#   python -m paretoq_jax.plan --config CONFIG --topology v5p:2x2x1 --slices 2 mesh.data=2 mesh.fsdp=-1
set -euo pipefail
config=${1:?usage: launch/tpu_multislice.sh CONFIG.yaml [key=value ...]}
shift
if [ -n "${MEGASCALE_NUM_SLICES:-}" ]; then
  echo "[launch] slice ${MEGASCALE_SLICE_ID:-?} of ${MEGASCALE_NUM_SLICES}" >&2
fi
exec "${PYTHON:-python}" -m paretoq_jax.train --config "${config}" --distributed "$@"
