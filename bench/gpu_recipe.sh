#!/usr/bin/env bash
# The GPU checks in one go, on a machine with one CUDA GPU: the CUDA tests, then experiment=shakespeare_gpu.
#
#   bash bench/gpu_recipe.sh DATA_FILE OUT_DIR [ALTERNATIVE ...]
#
# Seed 1 runs as configured and once per ALTERNATIVE (a quoted list of overrides, e.g. "optim.lr=1e-3"); the
# setting with the lower val loss then runs seeds 2 and 3. OUT_DIR receives gpu_info.txt, cuda_tests.log,
# summary.txt and runs.tar.gz (each run's log, metrics and TensorBoard events, results.json; no weights).
set -uo pipefail
data=$(realpath "$1")
out=$(realpath "$2")
shift 2
runs=$(mktemp -d)
export PYTHONUNBUFFERED=1
mkdir -p "$out"

pack() { tar -czf "$out/runs.tar.gz" -C "$runs" --exclude='*.safetensors' --exclude='*.ckpt' . ; }

{ nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
    >"$out/gpu_info.txt" 2>&1
timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py >"$out/cuda_tests.log" 2>&1
echo "cuda tests: exit $? ($(tail -1 "$out/cuda_tests.log"))" | tee "$out/summary.txt"

settings=("" "$@")
for i in "${!settings[@]}"; do
    # shellcheck disable=SC2086  # each setting is a list of overrides
    python3 bench/run_experiment.py --experiment shakespeare_gpu --data "$data" --seeds 1 --out "$runs/v$i" \
        ${settings[$i]} 2>&1 | sed "s/^/[v$i: ${settings[$i]:-as configured}] /" | tee -a "$out/summary.txt"
    pack
done

best=$(python3 - "$runs" "${#settings[@]}" <<'EOF'
import json, sys
from pathlib import Path
runs, n = Path(sys.argv[1]), int(sys.argv[2])
loss = {i: json.loads((runs / f"v{i}" / "results.json").read_text())["summary"]["val_loss_mean"]
        for i in range(n) if (runs / f"v{i}" / "results.json").exists()}
print(min(loss, key=loss.get) if loss else "")
EOF
)
[ -n "$best" ] || { echo "no run finished" | tee -a "$out/summary.txt"; exit 1; }
echo "best: v$best (${settings[$best]:-as configured}); seeds 2 and 3" | tee -a "$out/summary.txt"
# shellcheck disable=SC2086
python3 bench/run_experiment.py --experiment shakespeare_gpu --data "$data" --seeds 2 3 --out "$runs/v$best" \
    --append ${settings[$best]} 2>&1 | sed "s/^/[v$best] /" | tee -a "$out/summary.txt"
pack
