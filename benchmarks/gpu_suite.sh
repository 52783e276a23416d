#!/usr/bin/env bash
# Run lossplug's GPU checks (correctness at real size, speed, peak memory) on a CUDA machine.
#
# Installs nothing from the network: lossplug itself (editable, no dependencies, using the
# setuptools already present) and, when a wheels/ folder holds them, local wheels of the optional
# anchors liger-kernel (LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss) and
# cut-cross-entropy (linear cross-entropy; cut_cross_entropy-25.1.1-py3-none-any.whl needs only
# torch and triton). Without them those rows show n/a. Extra arguments go to gpu_suite.py, e.g.
#   bash benchmarks/gpu_suite.sh --repeats 50 --json gpu_results.json
#   bash benchmarks/gpu_suite.sh --linear-only       # only the linear cross-entropy section
#   bash benchmarks/gpu_suite.sh --quick             # no N*V > 2**31 case, no torch.compile,
#                                                    # 5 timed calls
# The report ends with one PASS/FAIL line per target (correctness, DESIGN.md time and memory).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -m pip install --quiet --no-deps --no-build-isolation -e .; then
    # no pip/setuptools offline: importing from the source tree works just as well
    echo "pip install -e . failed; using PYTHONPATH=src" >&2
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

shopt -s nullglob nocaseglob
wheels=(wheels/liger[_-]kernel*.whl wheels/cut[_-]cross[_-]entropy*.whl)
shopt -u nocaseglob
if ((${#wheels[@]})); then
    python -m pip install --quiet --no-deps --no-index "${wheels[@]}" ||
        echo "warning: could not install ${wheels[*]}; those anchors will show n/a" >&2
fi

python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader || true
exec python benchmarks/gpu_suite.py "$@"
