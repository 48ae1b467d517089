#!/usr/bin/env bash
# The from-scratch scaling study (issue 21, docs/scaling.md), resumable: rerun the same command
# and finished cells are skipped, interrupted ones resume from their last checkpoint.
#
#   launch/scaling-study.sh [WORKER_ID] [N_WORKERS]     # e.g. two workers: 0 2 and 1 2
#
# FLOAT_CELLS="0 1" limits the float stage to sizes s1 and s2.
# Each worker runs `nice -n 19` (the machine is shared), in priority order: its share of the float
# sizes, then QAT cells whose float start has been exported, exporting starts as they appear.
# Cells are claimed with flock, so workers never run one cell twice. Ends when nothing is left
# that it can run; then: python -m paretoq_jax.report runs/sweeps/scaling-qat --out reports/scaling
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-0}
N=${2:-1}
PY=(nice -n 19 python)
FLOAT=configs/sweeps/scaling-float.yaml
QAT=configs/sweeps/scaling-qat.yaml
# The corpus mixture is built once: a second worker started beside the first waits on the lock
# (it used to race the first and stop with "Directory not empty").
mkdir -p runs
[ -f data/mix-bpe2k/manifest.json ] ||
  flock runs/.mix-bpe2k.lock sh -c '[ -f data/mix-bpe2k/manifest.json ] ||
    exec "$@" -m paretoq_jax.data.mixture --out data/mix-bpe2k' sh "${PY[@]}"

# Priority: size s1 and s2 float starts, then the QAT cells that decide the claims first.
# FLOAT_CELLS (env): which float sizes this run pretrains, default all five (cells 0-4: s1-s4, s0).
read -r -a FLOAT_CELLS <<< "${FLOAT_CELLS:-0 1 2 3 4}"
H=runs/sweeps/scaling-float/hf
qat_order() {
  "${PY[@]}" -m paretoq_jax.sweep --config "$QAT" --dry-run 2>/dev/null |
    awk '$2 ~ /^(train|rtn|float)$/ {print $3}' |
    awk '
      /step450/ && /s[12]-/ {a[n1++]=$0; next}
      /step(400|475)/ {b[n2++]=$0; next}
      /model.init=random/ && /steps=0/ {next}
      /step250/ {c[n3++]=$0; next}
      /model.init=random/ {d[n4++]=$0; next}
      {e[n5++]=$0}
      END {for(i=0;i<n1;i++)print a[i]; for(i=0;i<n2;i++)print b[i]; for(i=0;i<n4;i++)print d[i];
           for(i=0;i<n3;i++)print c[i]; for(i=0;i<n5;i++)print e[i]}'
}
start_of() {  # the HF folder a QAT cell starts from ("" for random init)
  case "$1" in
    *model.init=random*) echo "" ;;
    model=scaling-s?-step*) echo "$H/${1%%~*}" | sed 's#/model=#/#' ;;
  esac
}
done_cell() { [ -f "runs/sweeps/scaling-qat/cells/$1/result.json" ]; }

for i in "${!FLOAT_CELLS[@]}"; do
  if (( i % N == W )); then
    "${PY[@]}" -m paretoq_jax.sweep --config "$FLOAT" --cell "${FLOAT_CELLS[$i]}" || true
    "${PY[@]}" -m paretoq_jax.scaling export runs/sweeps/scaling-float || true
  fi
done
mapfile -t CELLS < <(qat_order)
while :; do
  progress=0
  "${PY[@]}" -m paretoq_jax.scaling export runs/sweeps/scaling-float || true
  k=0
  for c in "${CELLS[@]}"; do
    k=$((k + 1))
    (( k % N == W )) || continue
    done_cell "$c" && continue
    s=$(start_of "$c")
    [ -z "$s" ] || [ -f "$s/config.json" ] || continue
    "${PY[@]}" -m paretoq_jax.sweep --config "$QAT" --cell "$c" || true
    done_cell "$c" && progress=1
  done
  n_done=$(ls runs/sweeps/scaling-float/cells/*/result.json 2>/dev/null | wc -l)
  if (( ! progress )); then
    (( n_done < ${#FLOAT_CELLS[@]} )) || break
    sleep 60  # float starts still being trained (by another worker): wait for their checkpoints
  fi
done
