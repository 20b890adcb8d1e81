#!/bin/bash
# issue 13c device call 2 (13:24-13:29 UTC): run from .snap13c = HEAD 67a3d91 plus this
# session's p2p.py (persistent waiter thread, before the exit hook), p2p_phases.py,
# test_wait_works.py; .snap13c_head = HEAD 67a3d91 as it was. Command:
#   cd .snap13c && ./run13c.sh 2>&1 | tee $OUT/log_call2.txt
# issue 13c device call 2: p2p phases (flat, fp8) x3, transfer bench x3 each, safety (this tree, HEAD's), gpu tests
export PYTHONPATH=$PWD OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=/tmp/r13c; mkdir -p $R
date -u
python -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())"
for L in flat deepseek-fp8; do for i in 1 2 3; do echo "== phases $L $i"; python benchmarks/eplb/gpu/p2p_phases.py --reps 25 --layout $L --json $R/phases_${L}_$i.json 2>&1 | grep -v Warning; tar czf $OUT/results.tgz -C $R .; done; done
for L in flat deepseek-fp8; do for i in 1 2 3; do echo "== transfer $L $i"; python benchmarks/eplb/gpu/bench_multi_gpu.py --num-ranks 2 --only transfer --layout $L --transports p2p,ipc --timeout 90 --json $R/xfer_${L}_$i.json 2>&1 | grep -v "Warning\|^transfer {"; tar czf $OUT/results.tgz -C $R .; done; done
echo "== safety (this tree)"; date -u; python benchmarks/eplb/gpu/bench_multi_gpu.py --num-ranks 2 --only safety --timeout 90 --json $R/safety.json 2>&1 | grep -v "Warning\|^safety "
echo "== safety p2p (HEAD's tree, wait as before)"; date -u; (cd ../.snap13c_head && PYTHONPATH=$PWD python benchmarks/eplb/gpu/bench_multi_gpu.py --num-ranks 2 --only safety --transports p2p --timeout 90 --json $R/safety_head_p2p.json 2>&1 | grep -v "Warning\|^safety ")
echo "== gpu tests"; date -u; python -m pytest -q -m gpu tests/distributed/async_eplb/ 2>&1 | tail -5
date -u
tar czf $OUT/results.tgz -C $R .
