#!/bin/bash
# issue 13, fourth H200 session (2026-11-30, from 17:00 UTC): in-flight overhead, measured on a
# snapshot of the tree (git archive of the commit named in RESULTS.md, section 8). Command:
#   cd .snap13d && RUNS=4 TIMERS=1 GPUTESTS=1 bash benchmarks/eplb/gpu/results/device_x2_issue13d_run.sh
# Per run: the simulated deployment (default preset, simulator defaults: 192 steps, a rebalance
# every 32 on a window of 32) and the decode-sized stand-in (30 ms GPU-bound forward), alternating.
export PYTHONPATH=$PWD OMP_NUM_THREADS=8 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R; LOG=$OUT/log.txt
RUNS=${RUNS:-4}
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import torch,sys;print('torch',torch.__version__,'python',sys.version.split()[0])"; nproc; } 2>&1 | tee -a $LOG
P=benchmarks/eplb/gpu/profile_sim_steps.py
for i in $(seq 1 $RUNS); do
  echo "== deployment run $i $(date -u +%T)" | tee -a $LOG
  python $P --plain --out-dir $R/dep$i -- --device cuda --ranks 2 --no-progress --out $R/dep$i/sim 2>&1 | tee -a $LOG
  echo "== stand-in run $i $(date -u +%T)" | tee -a $LOG
  python $P --plain --gpu-forward-ms 30 --out-dir $R/gpu$i -- --device cuda --ranks 2 --no-progress --out $R/gpu$i/sim 2>&1 | tee -a $LOG
done
if [ -n "$TIMERS" ]; then
  echo "== deployment timers-only $(date -u +%T)" | tee -a $LOG
  python $P --timers-only --out-dir $R/dept -- --device cuda --ranks 2 --no-progress --out $R/dept/sim 2>&1 | tee -a $LOG
  echo "== stand-in timers-only $(date -u +%T)" | tee -a $LOG
  python $P --timers-only --gpu-forward-ms 30 --out-dir $R/gput -- --device cuda --ranks 2 --no-progress --out $R/gput/sim 2>&1 | tee -a $LOG
fi
if [ -n "$GPUTESTS" ] && [ $SECONDS -lt 450 ]; then
  echo "== gpu tests $(date -u +%T)" | tee -a $LOG
  python -m pytest -q -p no:cacheprovider -m gpu tests/distributed/async_eplb/ 2>&1 | tail -5 | tee -a $LOG
fi
rm -f $R/*/sim/plot.png
tar czf $OUT/e13d.tgz -C $OUT r
date -u | tee -a $LOG
