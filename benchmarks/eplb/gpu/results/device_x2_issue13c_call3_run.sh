#!/bin/bash
# issue 13c device call 3 (13:36-13:37 UTC): tree = git archive of HEAD 545ffed (this session's commit, exit hook included). Command:
#   cd .snap13c && ./run13c3.sh 2>&1 | tee $OUT/log_call3.txt
# issue 13c call 3: does a p2p_phases run whose transport lives until exit now end cleanly?
export PYTHONPATH=$PWD OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
date -u
for L in flat deepseek-fp8; do echo "== phases $L"; python benchmarks/eplb/gpu/p2p_phases.py --reps 5 --layout $L 2>&1 | grep -v Warning; echo "exit code: ${PIPESTATUS[0]}"; done
date -u
