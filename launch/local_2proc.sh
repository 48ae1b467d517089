#!/usr/bin/env bash
# Two JAX processes on this machine (CPU), coordinated by jax.distributed.initialize: the same
# code path as a multi-host pod, for testing. Each process gets DEVICES_PER_PROC CPU devices.
#
#   launch/local_2proc.sh configs/tiny.yaml run_dir=/tmp/tiny-2proc [key=value ...]
#
# Environment: PORT (coordinator port, default 12355), DEVICES_PER_PROC (default 1), PYTHON.
set -euo pipefail
config=${1:?usage: launch/local_2proc.sh CONFIG.yaml [key=value ...]}
shift
port=${PORT:-12355}
per=${DEVICES_PER_PROC:-1}
python=${PYTHON:-python}
pids=()
for id in 0 1; do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${per}" \
  JAX_COORDINATOR_ADDRESS="localhost:${port}" JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=${id} \
    "${python}" -m paretoq_jax.train --config "${config}" --no-progress "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "${pid}" || status=$?; done
exit ${status}
