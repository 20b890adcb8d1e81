#!/bin/bash
# issue 13c device call 1 (13:16-13:21 UTC): the tree of HEAD 67a3d91 plus
# device_x2_issue13c_call1_poll_plain.patch (transport: plain messages in a
# 2-rank group, the calling thread polling the device wait) and that call's
# p2p_phases.py (variants transport-{batch,plain}-{thread,poll,sync}).
# Its fp8 phases runs failed (the script cut the layer to the flat width).
export PYTHONPATH=$PWD OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=$OUT/r; mkdir -p $R
TAG=${1:-call1}
SKIP_SAFETY=${2:-0}
date -u
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())"
echo "== phases flat 1 (NCCL_DEBUG=INFO, INIT)"
NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT python benchmarks/eplb/gpu/p2p_phases.py --reps 30 --json $R/phases_flat_1.json 2> $R/phases_flat_1_nccl_init.txt
grep -c "Init COMPLETE" $R/phases_flat_1_nccl_init.txt; grep "Init COMPLETE" $R/phases_flat_1_nccl_init.txt | head -8
for i in 2 3; do echo "== phases flat $i"; python benchmarks/eplb/gpu/p2p_phases.py --reps 30 --json $R/phases_flat_$i.json 2>&1 | grep -v Warning; done
for i in 1 2 3; do echo "== phases fp8 $i"; python benchmarks/eplb/gpu/p2p_phases.py --reps 30 --layout deepseek-fp8 --json $R/phases_fp8_$i.json 2>&1 | grep -v Warning; done
for i in 1 2 3; do echo "== transfer flat $i"; python benchmarks/eplb/gpu/bench_multi_gpu.py --num-ranks 2 --only transfer --transports p2p,ipc --timeout 90 --json $R/xfer_flat_$i.json 2>&1 | grep -v Warning; done
for i in 1 2 3; do echo "== transfer fp8 $i"; python benchmarks/eplb/gpu/bench_multi_gpu.py --num-ranks 2 --only transfer --layout deepseek-fp8 --transports p2p,ipc --timeout 90 --json $R/xfer_fp8_$i.json 2>&1 | grep -v Warning; done
if [ "$SKIP_SAFETY" = 0 ]; then
echo "== safety"; date -u; python benchmarks/eplb/gpu/bench_multi_gpu.py --num-ranks 2 --only safety --timeout 90 --json $R/safety.json 2>&1 | grep -v Warning
echo "== gpu tests"; date -u; python -m pytest -q -m gpu tests/distributed/async_eplb/ 2>&1 | tail -5
fi
date -u
tar czf $OUT/results_$TAG.tgz -C $R .
