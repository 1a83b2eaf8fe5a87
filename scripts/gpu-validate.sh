#!/usr/bin/env bash
# One command for a GPU: calibrate this device and run the quick validation
# suite against the calibration, writing everything into one folder.
#
#   scripts/gpu-validate.sh [OUT_DIR]        (default: reports/validation/cuda-<hardware preset>)
#   DEVICE=cpu scripts/gpu-validate.sh DIR   (rehearsal of the same steps on a CPU)
#   ARCHIVE=FILE.tgz scripts/gpu-validate.sh  (also pack the folder into one file to carry back)
#
# Needs only this repository and a PyTorch install (no network). flopsim's
# dependencies beyond what a PyTorch image usually holds are pydantic and its
# three small dependencies; if `import pydantic` fails, the wheels in .whl/
# are installed into a private folder first. Fetch them on a machine with
# network with scripts/fetch-gpu-wheels.sh (pydantic 2.13.4, pydantic-core
# 2.46.4 for CPython 3.12, annotated-types 0.7.0, typing-inspection 0.4.2,
# typing-extensions 4.15.0). numpy, sympy, pandas, pyyaml, scipy, typer, rich
# and matplotlib are taken from the image.
#
# Writes into OUT_DIR: calibration.yaml (the measured calibration, provenance
# measured), per_op.csv, per_model.csv, speedups.csv, summary.json,
# summary.md, scatter.png, error_by_kind.png, environment.txt, run.log, aten.csv
# (scripts/aten_profile.py: per aten op, calls and host and device seconds per step)
# and sustained.csv (scripts/sustained_gemm.py: a large product's throughput, SM
# clock and power in windows over SUSTAIN_S seconds, default 20, of back-to-back
# calls, then 4 s of zero operands and, on a GPU, 4 s beside a stream of copies)
# (twelve files: set ARCHIVE to get them as one).
# Copy calibration.yaml to specs/calibration/<hardware>.yaml to make it the
# device's calibration (the validation writes it into OUT_DIR only). Took
# 214 s on an H200 (2026-11-27, before aten.csv was added); the same steps
# took 360 s on the 2-core Xeon development CPU (2026-11-28, aten.csv and sustained.csv
# included) and 430 s on the 2-core AMD EPYC one once the product grid measured every m
# up to 4 (60 more products on a GPU too).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
SITE="${TMPDIR:-/tmp}/flopsim-site"

if ! python3 -c "import pydantic" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "flopsim: error: pydantic is not installed and .whl/ holds no wheels (run scripts/fetch-gpu-wheels.sh where there is network)" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

HARDWARE="$(python3 -c "from flopsim.calibrate import guess_hardware; print(guess_hardware('$DEVICE'))")"
OUT="${1:-reports/validation/$DEVICE-$HARDWARE}"
mkdir -p "$OUT"
{
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    python3 -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version())"
    python3 -c "import torch; print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
    echo "hardware preset $HARDWARE"
} > "$OUT/environment.txt" 2>&1

START=$SECONDS
python3 -m flopsim validate --device "$DEVICE" --suite quick --recalibrate --hardware "$HARDWARE" \
    --out "$OUT" 2>&1 | tee "$OUT/run.log"
# where each step's time goes, per aten op (calls, host and device seconds per step): a diagnostic
python3 scripts/aten_profile.py --device "$DEVICE" --suite quick --out "$OUT/aten.csv" >> "$OUT/run.log" 2>&1 \
    || echo "gpu-validate: aten_profile failed (run.log says why); the validation above stands" | tee -a "$OUT/run.log"
# whether a product keeps its short-loop speed when it runs for seconds (power-limited clocks): a diagnostic
python3 scripts/sustained_gemm.py --device "$DEVICE" --seconds "${SUSTAIN_S:-20}" --out "$OUT/sustained.csv" 2>&1 \
    | tee -a "$OUT/run.log" \
    || echo "gpu-validate: sustained_gemm failed (run.log says why); the validation above stands" | tee -a "$OUT/run.log"
echo "gpu-validate: done in $((SECONDS - START)) s; folder $OUT" | tee -a "$OUT/run.log"
if [ -n "${ARCHIVE:-}" ]; then  # one file to carry back (e.g. ARCHIVE=$OUT_DIR/cuda.tgz)
    tar czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")"
    echo "gpu-validate: archived into $ARCHIVE"
fi
