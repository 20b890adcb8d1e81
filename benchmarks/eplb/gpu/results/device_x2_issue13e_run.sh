#!/bin/bash
# issue 13, fifth H200 session (2026-11-30, from 19:30 UTC): what the slowest commit steps spend,
# on a snapshot of the tree (git archive of the commit named in RESULTS.md, section 9). Command:
#   cd .snap13e && PLAN="gput gpux gpux gpux dsx gpu gpu" bash benchmarks/eplb/gpu/results/device_x2_issue13e_run.sh
# PLAN lists the runs in order: dep / gpu (deployment / decode-sized stand-in with a 30 ms GPU-bound
# forward, plain), dept / gput (timers-only), depx / gpux / dsx (--trace-commits; dsx on
# --preset deepseek-v3), deps / gpus (--trace-steps), ds (--preset deepseek-v3, plain).
# COPYLOG=X logs the main thread's torch._foreach_copy_ calls slower than X ms. GPUTESTS=1 adds pytest -m gpu.
export PYTHONPATH=$PWD OMP_NUM_THREADS=8 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R; LOG=$OUT/log.txt
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import torch,sys;print('torch',torch.__version__,'python',sys.version.split()[0])"; nproc; } 2>&1 | tee -a $LOG
P=benchmarks/eplb/gpu/profile_sim_steps.py
i=0
for kind in $PLAN; do
  i=$((i+1))
  case $kind in
    dep) mode=--plain; sim=();;
    gpu) mode=--plain; sim=(--gpu-forward-ms 30);;
    dept) mode=--timers-only; sim=();;
    gput) mode=--timers-only; sim=(--gpu-forward-ms 30);;
    depx) mode=--trace-commits; sim=();;
    gpux) mode=--trace-commits; sim=(--gpu-forward-ms 30);;
    ds) mode=--plain; sim=(); preset=(--preset deepseek-v3);;
    dsx) mode=--trace-commits; sim=(); preset=(--preset deepseek-v3);;
    deps) mode=--trace-steps; sim=();;
    gpus) mode=--trace-steps; sim=(--gpu-forward-ms 30);;
  esac
  case $kind in ds|dsx) ;; *) preset=();; esac
  d=$R/$i-$kind
  echo "== run $i: $kind $(date -u +%T)" | tee -a $LOG
  python $P $mode "${sim[@]}" ${COPYLOG:+--slow-copy-ms $COPYLOG} --out-dir $d -- --device cuda --ranks 2 "${preset[@]}" --no-progress --out $d/sim 2>&1 | tee -a $LOG
done
if [ -n "$GPUTESTS" ]; then
  echo "== gpu tests $(date -u +%T)" | tee -a $LOG
  python -m pytest -q -p no:cacheprovider -m gpu tests/distributed/async_eplb/ 2>&1 | tail -5 | tee -a $LOG
fi
rm -f $R/*/sim/plot.png
tar czf $OUT/e13e.tgz -C $OUT r
date -u | tee -a $LOG
