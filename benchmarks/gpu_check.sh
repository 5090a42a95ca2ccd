#!/usr/bin/env bash
# The GPU check: one command, under 8 minutes on one H100/H200. See benchmarks/gpu_check.py for the parts.
#
#   bash benchmarks/gpu_check.sh                 # on a machine with CUDA; skips cleanly without it
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh # dry run on CPU, tiny sizes (checks the script itself)
#
# The lent GPU machine has torch, numpy, pandas, PyYAML, typer, rich, scikit-learn, but not pydantic or kornia and
# cannot download: carry them as wheels in .whl/ (ignored by git; docs/performance.md says how to fill it).
# fedshift itself is installed from this tree into a private folder, so nothing on the machine changes.
set -uo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
RESULTS=${GPU_CHECK_RESULTS:-benchmarks/results}
DRY=${GPU_CHECK_DRY:-0}
if [ "$DRY" != 1 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; skipped"; exit 0
fi
SITE=$(mktemp -d /tmp/fedshift-gpu-site.XXXX)
if ! $PY -c "import pydantic, kornia" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 1
  else
    echo "gpu_check: pydantic/kornia missing and no wheels in .whl/"; exit 1
  fi
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$SITE" . \
  >/dev/null || { echo "gpu_check: could not install fedshift from this tree"; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
mkdir -p "$RESULTS"
if [ "$DRY" = 1 ]; then
  name="gpu_check_dry.json"; extra=(--allow-cpu)
else
  name="gpu_check_$(date +%Y%m%d-%H%M).json"; extra=()
fi
$PY benchmarks/gpu_check.py --json "$RESULTS/$name" "${extra[@]}" "$@"
rc=$?
[ -n "${OUT:-}" ] && cp "$RESULTS/$name" "$OUT/" 2>/dev/null
echo "gpu_check: results in $RESULTS/$name"
exit $rc
