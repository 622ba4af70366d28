#!/usr/bin/env bash
# The one prepared command of a lent GPU session (device time is short: ~15 minutes, machine start included).
#
#   bash bench/gpu_session.sh wheels   # here, first: the project's deps the GPU machine lacks, as wheels in .whl/
#   bash bench/gpu_session.sh run      # on the GPU machine (device tool: carry [".whl"], timeout_s 600):
#                                      # SDXL timings per profile x identity + launches per step, into $OUT
#   bash bench/gpu_session.sh dry      # here: the same two scripts on the tiny models on the CPU (plumbing check)
#
# The GPU machine has torch but not diffusers, torchao, pydantic, sqlalchemy ...: `wheels` downloads exactly the
# versions of this checkout's .venv (pure Python or manylinux, for the machine's Python 3.12), `run` installs them
# into /tmp/site without touching the machine's torch. What `run` measures is the open question of issue 13 (SDXL's
# identity overhead is host time per kernel): `fast` against its compiled blocks in CUDA graphs (`fast:graphs`) and
# with inductor's C++ wrapper (`fast:cpp`), and the kernel launches per step of eager and `fast`.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(diffusers torchao pydantic pydantic_core pydantic-settings annotated-types typing-inspection python-dotenv
        SQLAlchemy alembic Mako PyWavelets invisible-watermark obstore)
SDXL_PROFILES=(quality fast fast:graphs fast:cpp)

case "${1:-}" in
  wheels)
    specs=()
    for name in "${WHEELS[@]}"; do
      specs+=("$name==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")")
    done
    rm -rf .whl && mkdir -p .whl
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl "${specs[@]}"
    mkdir -p .git/info && { grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude; }
    echo "wheels in .whl/ ($(du -sh .whl | cut -f1)); now: device run, carry [\".whl\"], 'bash bench/gpu_session.sh run'"
    ;;
  run)
    [ -d .whl ] || { echo "no .whl/: run 'bash bench/gpu_session.sh wheels' here first and carry .whl"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    out="${OUT:-out}" && mkdir -p "$out"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
    python3 bench/gpu_check.py --families sdxl --sdxl-profiles "${SDXL_PROFILES[@]}" --batches 1 --skip-tests \
      --budget-s "${BUDGET_S:-330}" --out "$out/gpu_check.json" --markdown "$out/gpu_check.md" 2>&1 \
      | tee "$out/gpu_check.log"
    timeout "${STEP_OPS_S:-150}" python3 bench/step_ops.py --device cuda --full-size --profiles quality fast \
      --steps 3 2>&1 | tee "$out/step_ops.txt"
    ;;
  dry)
    out="${OUT:-/tmp/gpu_session}" && mkdir -p "$out"
    .venv/bin/python bench/gpu_check.py --dry-run --families sdxl --sdxl-profiles "${SDXL_PROFILES[@]}" \
      --skip-tests --out "$out/gpu_check.json" --markdown "$out/gpu_check.md"
    .venv/bin/python bench/step_ops.py --profiles quality fast --steps 2
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh wheels|run|dry"
    exit 2
    ;;
esac
