#!/usr/bin/env bash
# One command for a session with a GPU: kernel parity tests on the device, the kernel
# benchmark, `gradcam-batch bench` on resnet50 (batch 256, bf16, compile off and on), and the
# end-to-end run. Everything lands in one folder; the whole script stays under 10 minutes
# (a global deadline caps every step, so a slow step cannot starve the ones after it).
#
#   benchmarks/gpu.sh [OUT_DIR]        # default: $OUT when set, else gpu-results/
#
# Steps whose code has not landed yet (a missing test file, script, option or command) are
# recorded as skipped in summary.txt instead of failing the run. Set WHEELS=DIR to install
# the baselines (grad-cam, captum) from local wheels on a machine without a package index.
#
# Install: editable, without build isolation. That needs setuptools >= 70.1, or setuptools >= 64
# with the `wheel` package (older setuptools build editables through wheel's bdist_wheel: the stock
# setuptools 65.5 of a fresh Python 3.11 venv fails with "invalid command 'bdist_wheel'"). Without
# either, or when it fails, the wheel in dist/ is installed instead, which needs no build backend;
# build it beside the tree before the session (`pip wheel . --no-deps -w dist/`) and carry dist/.
# INSTALL=wheel skips the editable attempt, INSTALL=editable never falls back. The wheel is
# checked file by file against the tree, so a stale wheel is reported rather than benchmarked.
#
# DRY_RUN=1 (a machine without a GPU): install, versions, imports and the kernel tests (under
# Triton's interpreter) run; the device-only steps are checked for presence and skipped.
set -u -o pipefail

cd "$(dirname "$0")/.."
# The working directory is the repository root: `python -c` and `-m` would put it first on sys.path,
# where its kernels/ folder shadows Hugging Face's `kernels` package (see the Makefile).
export PYTHONSAFEPATH=1
OUT_DIR="${1:-${OUT:-gpu-results}}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
PY="${PYTHON:-python3}"
INSTALL_MODE="${INSTALL:-auto}"
DRY_RUN="${DRY_RUN:-0}"
START=$(date +%s)
LIMIT="${GPU_SH_LIMIT:-560}"  # seconds for the whole script, under the 10-minute budget

: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME BUDGET_S CMD...: run CMD with its output in NAME.log, within BUDGET_S and the deadline.
step() {
  local name="$1" budget="$2"
  shift 2
  local left=$((LIMIT - ($(date +%s) - START)))
  if ((left < 20)); then
    note "SKIP  $name: no time left"
    return 0
  fi
  ((budget > left)) && budget=$left
  local t0=$(date +%s)
  echo "\$ $*" >"$OUT_DIR/$name.log"
  timeout --kill-after=10 "$budget" "$@" >>"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  LAST_RC=$rc
  local status="ok"
  ((rc == 124 || rc == 137)) && status="TIMEOUT after ${budget}s"
  ((rc != 0 && rc != 124 && rc != 137)) && status="FAILED rc=$rc"
  local cmd="$*"
  [[ "$cmd" == *$'\n'* ]] && cmd="${cmd%%$'\n'*} ..."  # first line of a multi-line -c script
  note "$(printf '%-5s %s (%ss): %s' "${status%% *}" "$name" "$(($(date +%s) - t0))" "$cmd")"
  [[ "$status" != ok ]] && note "      $status; see $name.log"
  return 0
}

# device_step: like step, but skipped in a dry run (it needs a CUDA device).
device_step() {
  if [[ "$DRY_RUN" == 1 ]]; then
    note "SKIP  $1: needs the GPU (dry run): ${*:3}"
    return 0
  fi
  step "$@"
}

note "gradcam-batch GPU run$([[ "$DRY_RUN" == 1 ]] && echo " (DRY RUN)"), $(date -u '+%Y-%m-%d %H:%M UTC')"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"; } \
  | tee "$OUT_DIR/gpu.txt" | sed 's/^/gpu   /' | tee -a "$SUMMARY"

# Every module of the wheel must equal its source in the tree (gradcam_batch/X/... is X/... for the
# folders that pyproject.toml maps), and every module of the tree must be in the wheel.
WHEEL_CHECK='
import sys, zipfile, pathlib
mapped = ("engine", "kernels", "cli")
def source(name):
    parts = name.split("/")[1:]
    return pathlib.Path(*parts) if parts[0] in mapped else pathlib.Path("gradcam_batch", *parts)
with zipfile.ZipFile(sys.argv[1]) as wheel:
    modules = {n: wheel.read(n) for n in wheel.namelist() if n.startswith("gradcam_batch/") and n.endswith(".py")}
stale = sorted(n for n, data in modules.items() if not source(n).is_file() or source(n).read_bytes() != data)
shipped = {source(n) for n in modules}
tree = [p for d in ("gradcam_batch",) + mapped for p in pathlib.Path(d).rglob("*.py") if "__pycache__" not in p.parts]
missing = sorted(str(p) for p in tree if p not in shipped)
print(len(modules), "modules in the wheel;", len(stale), "differ from the tree;", len(missing), "missing from it")
for n in stale + missing:
    print("  ", n)
sys.exit(1 if stale or missing else 0)
'
# Can this environment build an editable install without build isolation? (see the top)
EDITABLE_CHECK='
import importlib.metadata as md, importlib.util, sys
try:
    version = md.version("setuptools")
except md.PackageNotFoundError:
    sys.exit("no setuptools")
v = tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:2])
if v < (64, 0):
    sys.exit(f"setuptools {version} < 64")
if v < (70, 1) and importlib.util.find_spec("wheel") is None:
    sys.exit(f"setuptools {version} < 70.1 without the wheel package")
'
INSTALLED=""
if [[ "$INSTALL_MODE" != wheel ]]; then
  if WHY="$("$PY" -c "$EDITABLE_CHECK" 2>&1)"; then
    LAST_RC=1
    step install 120 "$PY" -m pip install --no-deps --no-build-isolation -e .
    ((LAST_RC == 0)) && INSTALLED="editable"
  else
    note "SKIP  install (editable): $WHY; going to the wheel"
  fi
fi
if [[ -z "$INSTALLED" && "$INSTALL_MODE" != editable ]]; then
  WHEEL="$(ls -t dist/gradcam_batch-*.whl 2>/dev/null | head -n 1)"
  if [[ -n "$WHEEL" ]]; then
    LAST_RC=1
    step install-wheel 60 "$PY" -m pip install --no-deps --no-index --force-reinstall "$WHEEL"
    if ((LAST_RC == 0)); then
      INSTALLED="wheel $WHEEL"
      step wheel-matches-tree 30 "$PY" -c "$WHEEL_CHECK" "$WHEEL"
    fi
  else
    note "SKIP  install-wheel: no dist/gradcam_batch-*.whl (build one here: pip wheel . --no-deps -w dist/)"
  fi
fi
note "installed: ${INSTALLED:-NOTHING (the steps below use whatever gradcam_batch is importable)}"
if [[ -n "${WHEELS:-}" ]]; then
  step baselines-install 60 "$PY" -m pip install --no-index --find-links "$WHEELS" grad-cam captum
fi
step versions 30 "$PY" -c "import sys, importlib.metadata as md, torch, gradcam_batch
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print(*[f'{n} {v(n)}' for n in ('triton', 'numpy', 'torchvision', 'pyarrow', 'setuptools')], sep=', ')
print('gradcam_batch', gradcam_batch.__version__, 'from', gradcam_batch.__file__)"
grep -E '^(python|triton|gradcam_batch) ' "$OUT_DIR/versions.log" | sed 's/^/      /' | tee -a "$SUMMARY"
step imports 60 "$PY" -c "import gradcam_batch.kernels.cam_kernel, gradcam_batch.kernels.aot, gradcam_batch.engine, \
gradcam_batch.cli; from gradcam_batch import Explainer; print('ok')"

if [[ -f tests/test_kernels.py ]]; then
  step kernel-tests 150 "$PY" -m pytest tests/test_kernels.py -q -m '' -p no:cacheprovider
  grep -E '[0-9]+ (passed|failed)' "$OUT_DIR/kernel-tests.log" | tail -n 1 | sed 's/^/      /' | tee -a "$SUMMARY"
else
  note "SKIP  kernel-tests: tests/test_kernels.py not there yet"
fi

if [[ -f benchmarks/bench_kernel.py ]]; then
  step kernel-bench-syntax 30 "$PY" -m py_compile benchmarks/bench_kernel.py
  device_step kernel-bench 90 "$PY" benchmarks/bench_kernel.py
else
  note "SKIP  kernel-bench: benchmarks/bench_kernel.py not there yet"
fi

BENCH=("$PY" -m gradcam_batch bench --model torchvision:resnet50 --device cuda --batch-size 256 --image-size 224
  --top-k 1,5 --iters 10 --warmup 3)
HELP="$("$PY" -m gradcam_batch bench --help 2>/dev/null || true)"
if [[ -z "$HELP" ]]; then
  note "SKIP  bench: gradcam-batch bench is not available"
else
  device_step bench-bf16-eager 120 "${BENCH[@]}" --precision bf16 --json "$OUT_DIR/bench-bf16-eager.json"
  if grep -q -- "--compile" <<<"$HELP"; then
    # The first compiled calls include compilation: more warm-up rounds.
    device_step bench-bf16-compiled 180 "${BENCH[@]}" --precision bf16 --compile --warmup 5 \
      --json "$OUT_DIR/bench-bf16-compiled.json"
  else
    note "SKIP  bench-bf16-compiled: this build's bench has no --compile option"
  fi
  # pytorch-grad-cam's default usage is fp32 (it converts maps to numpy, which has no bf16).
  device_step bench-fp32 120 "${BENCH[@]}" --precision fp32 --check --json "$OUT_DIR/bench-fp32.json"
fi

if grep -q -- "--end-to-end" <<<"$HELP"; then
  device_step end-to-end 150 "$PY" -m gradcam_batch bench --model torchvision:resnet50 --device cuda --batch-size 256 \
    --precision bf16 --top-k 1 --baselines inference --iters 3 --warmup 1 --end-to-end \
    --json "$OUT_DIR/end-to-end.json"
else
  note "SKIP  end-to-end: this build's bench has no --end-to-end option"
fi

note "done in $(($(date +%s) - START))s; results in $OUT_DIR"
