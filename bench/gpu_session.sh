#!/usr/bin/env bash
# The one prepared command of a lent GPU session (device time is short: ~15 minutes, machine start included).
#
#   bash bench/gpu_session.sh wheels   # here, first: the project's deps the GPU machine lacks, as wheels in .whl/
#   bash bench/gpu_session.sh run      # on the GPU machine (device tool: carry [".whl"], timeout_s 600): the CUDA
#                                      # graph parity test, then SDXL timings per profile x identity, into $OUT
#   bash bench/gpu_session.sh compile-cache   # on a GPU machine, a session of its own: a replica's compile warm-up
#                                      # cold and on a fresh machine with the stored artifacts (compile_cache.py)
#   bash bench/gpu_session.sh dry      # here: the same two scripts on the tiny models on the CPU (plumbing check)
#
# The GPU machine has torch but not diffusers, torchao, pydantic, sqlalchemy ...: `wheels` downloads exactly the
# versions of this checkout's .venv (pure Python or manylinux, for the machine's Python 3.12), `run` installs them
# into /tmp/site without touching the machine's torch (facexlib / filterpy: the tiny stand-ins' builder, which the
# tests need). What `run` checks: that SDXL's `fast` (compiled blocks in CUDA graphs) replays every batch composition
# as eager does (the parity test; on CPUs it runs without graphs), then the open timings of issue 13: `quality` and
# `fast` at batch 1 and 4 with `--busy` (the device's working time per row: is the identity overhead under graphs GPU
# work or host work?) and `--stamp-beside` (do a replica's stamps behind the next batch slow the render they overlap?),
# then, in the time left, bench/step_ops.py on SDXL `fast`: per step graph replays, input copies, device time and the
# host's top operators of plain, PuLID and FaceID; last bench/method_switch.py (a switch of identity methods). SDXL
# `fastest` (fp8 in CUDA graphs since 2026-12-05) needs a session of its own (its fp8 compile may take minutes: 336 s
# on FLUX): SDXL_PROFILES="quality fast fastest".
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(diffusers torchao pydantic pydantic_core pydantic-settings annotated-types typing-inspection python-dotenv
        SQLAlchemy alembic Mako PyWavelets invisible-watermark obstore facexlib filterpy)
read -r -a SDXL_PROFILES <<<"${SDXL_PROFILES:-quality fast}"
PARITY_TEST="tests/identity_pulid/test_sdxl_compile.py::test_cuda_graphs_of_the_fast_profile_replay_every_batch_composition_as_eager"

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
    IMAGEGEN_DEVICE=cuda timeout "${PARITY_S:-150}" python3 -m pytest -q -p no:cacheprovider -W ignore "$PARITY_TEST" \
      2>&1 | tee "$out/parity.txt" || true
    python3 bench/gpu_check.py --families sdxl --sdxl-profiles "${SDXL_PROFILES[@]}" --batches 1 4 --repeats 2 --busy \
      --stamp-beside --skip-tests --budget-s "${BUDGET_S:-280}" --sdxl-budget-s "${BUDGET_S:-280}" --out "$out/gpu_check.json" \
      --markdown "$out/gpu_check.md" 2>&1 | tee "$out/gpu_check.log"
    # where SDXL `fast`'s identity overhead goes (graph replays, input copies, device time, top host operators), in
    # what is left of the command's 600 s
    left=$(( ${SESSION_S:-570} - SECONDS ))
    if [ "$left" -gt 90 ]; then
      timeout "$left" python3 bench/step_ops.py --device cuda --full-size --families sdxl --profiles fast --steps 3 \
        2>&1 | tee "$out/step_ops.txt" || true
    else
      echo "step_ops skipped: ${left} s left" | tee "$out/step_ops.txt"
    fi
    # what switching identity methods costs a replica at full size now (the layers put back, not rebuilt)
    left=$(( ${SESSION_S:-570} - SECONDS ))
    if [ "$left" -gt 45 ]; then
      timeout "$left" python3 bench/method_switch.py --device cuda 2>&1 | tee "$out/method_switch.txt" || true
    fi
    ;;
  compile-cache)
    # a replica's warm-up on a fresh machine: FLUX `fast` (or $CC_FAMILY / $CC_PROFILE) compiled twice in two processes
    # with empty local compile directories and one object store; the second loads the first's artifact
    # (imagegen/pipelines/compile_cache.py). Compare the two runs' `first_s` (the compile warm-up). ~4 minutes.
    [ -d .whl ] || { echo "no .whl/: run 'bash bench/gpu_session.sh wheels' here first and carry .whl"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    out="${OUT:-out}" && mkdir -p "$out"
    family="${CC_FAMILY:-flux}" && profile="${CC_PROFILE:-fast}"
    for arm in cold fresh-machine; do
      IMAGEGEN_COMPILE_CACHE_DIR="$(mktemp -d)" timeout "${CC_ARM_S:-280}" python3 bench/gpu_check.py \
        --families "$family" "--$family-profiles" "$profile" --methods plain --batches 1 --skip-tests \
        --compile-store "$out/compile-store" --out "$out/compile_cache_$arm.json" \
        --markdown "$out/compile_cache_$arm.md" 2>&1 | tee "$out/compile_cache_$arm.log" || true
    done
    ;;
  dry)
    out="${OUT:-/tmp/gpu_session}" && mkdir -p "$out"
    .venv/bin/python -m pytest -q -p no:cacheprovider "$PARITY_TEST"  # here: the compiled blocks without graphs
    .venv/bin/python bench/gpu_check.py --dry-run --families sdxl --sdxl-profiles "${SDXL_PROFILES[@]}" \
      --batches 1 4 --busy --stamp-beside --skip-tests --out "$out/gpu_check.json" --markdown "$out/gpu_check.md"
    .venv/bin/python bench/step_ops.py --families sdxl --profiles fast --steps 2
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh wheels|run|compile-cache|dry"
    exit 2
    ;;
esac
