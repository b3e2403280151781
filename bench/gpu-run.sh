#!/usr/bin/env bash
# One borrowed GPU machine's checks, in one go (bench/README.md, "GPU rows"):
#   1. the CUDA-marked tests of solver/ and workers/, and the service's head-kind tests
#      (finetunes of every head kind, extraction on the GPU);
#   2. bench/gpu.py: solver iterations and time to a certificate, backbone forwards
#      (fp32/fp16/bf16, channels_last), the whole extraction pipeline;
#   3. bench/heads.py --convex-only on the GPU (real Lite0 feature maps of Fashion-MNIST);
#   4. bench/serve.py on the GPU.
# Run from the repository root: bash bench/gpu-run.sh. GPU_PARTS=tests,serve picks parts and
# GPU_ROWS_S / GPU_HEADS_S / GPU_SERVE_S set their time limits (on an H200 the solver rows
# alone took about 100 s and the forward rows about 50). Logs and JSON go to $OUT (default bench/results/gpu).
# Python packages missing there can be carried as wheels in .whl/, and Fashion-MNIST's four
# files in .fmnist/ (both git-ignored).
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
ROOT=$(pwd)
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .fmnist ] && export CVXTUNE_FASHION_MNIST=$ROOT/.fmnist
nvidia-smi -L
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0), 'cpus', len(__import__('os').sched_getaffinity(0)))"

part() {  # part NAME SECONDS COMMAND...: run under a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  case ",${GPU_PARTS:-tests,head-kinds,rows,heads,serve}," in *",$name,"*) ;; *) return ;; esac
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? in $((SECONDS - t0)) s"
  tail -n 6 "$OUT/$name.log"
}

# The CUDA tests do not call CVXPY; where it is not installed, a stand-in lets their modules
# import (the CVXPY agreement tests run in CI on the CPU).
STUB=
if ! python3 -c "import cvxpy" 2> /dev/null; then
  mkdir -p /tmp/stub/cvxpy && echo '"""Stand-in for the GPU run."""' > /tmp/stub/cvxpy/__init__.py
  STUB=/tmp/stub:
fi
PYTHONPATH=$STUB${PYTHONPATH:-} part tests 100 python3 -m pytest -q -p no:cacheprovider -m cuda \
  tests/solver/test_estimator.py tests/solver/test_cnn.py tests/solver/test_attention.py \
  tests/workers/test_extract.py
part head-kinds 100 python3 -m pytest -q -p no:cacheprovider tests/app/test_head_kinds.py
part rows "${GPU_ROWS_S:-240}" python3 bench/gpu.py --out "$OUT/gpu.json" --pipeline-n 2048
part heads "${GPU_HEADS_S:-150}" python3 bench/heads.py --device cuda --convex-only \
  --out "$OUT/heads.json"
# cvxtune first: the bare endpoint's concurrent forwards on one GPU can stall for seconds.
part serve "${GPU_SERVE_S:-120}" python3 bench/serve.py --seconds 5 --servers cvxtune,bare \
  --out "$OUT/serve.json"
