#!/usr/bin/env bash
# benchmarks/gpu_check.sh: everything a lent GPU should check and measure, in one call, in about 8 minutes
# (the steps' limits add up to 500 s; they usually end well before).
#
# Prepare here (a machine with PyPI), once: what the device lacks travels as wheels in .whl/ (git-ignored):
#   bash benchmarks/gpu_check.sh --fetch-wheels         # mpich and mpi4py for Python 3.12, about 15 MB
# Commit first: the check runs from a clean clone of the last commit. Then on the device (no network; its
# image has python3 with torch, numba, numba-cuda, numpy, pytest and hypothesis), through the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=570)
# Or on any CUDA machine whose python3 has those packages: bash benchmarks/gpu_check.sh
#
# Steps, each under its own time limit; a step that fails is reported and the next one runs:
#   1. the machine: nvidia-smi, python3 and its packages
#   2. a clean clone of this repository's last commit (or this copy, where there is no .git), and the
#      carried wheels installed into a prefix of their own (put first on PYTHONPATH, PATH and
#      LD_LIBRARY_PATH): nothing is fetched
#   3. the kernel tests unmodified, without the simulator: GEMM, attention, fused epilogues, elementwise,
#      shuffle, the backend, the contract suite's numba properties, tensor parallel on numba ranks (two
#      ranks on the one GPU), and the static checks
#   4. python -m numba_kernels.tune for the gpt2 shapes -> numba_kernels/tuning.json
#   5. benchmarks/gpu_kernels.py (old kernels beside new, against copy bandwidth and torch) -> RESULTS.md
#   6. benchmarks/gpu_policies.py (fused vs serial vs dynamic vs instances on the gpt2 shape) -> RESULTS.md
# Results: the gpu_kernels and gpu_policies sections of benchmarks/RESULTS.md (merged into this checkout's,
# the other sections untouched) and numba_kernels/tuning.json; when $OUT is set (the device tool), copied
# there with the log. Back on the development machine, merge what came back, then commit:
#   bash benchmarks/gpu_check.sh --merge <files_at>     # RESULTS.md's gpu sections and tuning.json
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=$ROOT/.whl

merge() {  # merge RESULTS: its gpu sections (and only those) into this checkout's RESULTS.md
    "${PYTHON:-python3}" - "$1" <<'PY'
import re
import sys

sys.path.insert(0, "benchmarks")
import harness  # noqa: E402

text = open(sys.argv[1]).read()
for name in ("gpu_kernels", "gpu_policies"):
    found = re.search(rf"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    if found:
        harness.write_section(name, found.group(1))
PY
}

if [[ "${1:-}" == "--merge" ]]; then  # after a device run: the files it brought back, into this checkout
    merge "$2/RESULTS.md"
    if [[ -f "$2/tuning.json" ]]; then cp "$2/tuning.json" numba_kernels/tuning.json; fi
    exit 0
fi

if [[ "${1:-}" == "--fetch-wheels" ]]; then  # on a machine with PyPI, for the device's Python 3.12
    grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    mkdir -p "$WHEELS"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$WHEELS" mpich==5.0.2 mpi4py==4.1.2
    ls -la "$WHEELS"
    exit 0
fi

LOG=${OUT:-/tmp}/gpu_check.log
PYTHON=${PYTHON:-python3}  # the interpreter that holds torch, numba and numba-cuda
PREFIX=/tmp/flover-gpu-prefix
START=$SECONDS
FAILED=()
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
unset NUMBA_ENABLE_CUDASIM

step() {  # step NAME SECONDS COMMAND...: run, time and record one step
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s, at $((SECONDS - START))s)"
    local begin=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - begin))s"
    [[ $status -eq 0 ]] || FAILED+=("$name ($status)")
}

{
    step machine 20 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$0" --version;
        "$0" -m pip list 2>/dev/null | grep -i -E "^(numba|numba-cuda|numpy|torch|mpi4py|cuda-bindings|pytest|hypothesis) "' \
        "$PYTHON"

    WORK=$ROOT
    if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
        rm -rf /tmp/flover-clean && git clone -q "$ROOT" /tmp/flover-clean && WORK=/tmp/flover-clean
    fi
    cd "$WORK" && echo "=== working in $WORK ($(git log -1 --format='%h %s' 2>/dev/null | cut -c1-80))"
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        step wheels 60 "$PYTHON" -m pip install -q --no-index --no-deps --prefix "$PREFIX" "$WHEELS"/*.whl
        SITE=$(echo "$PREFIX"/lib/python3*/site-packages)
        export PYTHONPATH=$SITE PATH=$PREFIX/bin:$PATH LD_LIBRARY_PATH=$PREFIX/lib:${LD_LIBRARY_PATH:-}
    fi
    export PYTHONPATH=$WORK${PYTHONPATH:+:$PYTHONPATH}
    step imports 30 "$PYTHON" -c 'import numba_kernels, flover, torch; print("imports ok; torch sees CUDA:", torch.cuda.is_available())'
    "$PYTHON" -c 'import mpi_tp' 2>/dev/null || echo "=== no working MPI: the tensor-parallel tests will skip"

    step tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_numba_gemm.py tests/test_numba_attention.py \
        tests/test_numba_fused.py tests/test_numba_elementwise.py tests/test_numba_shuffle.py tests/test_numba_backend.py \
        tests/test_tp_numba.py tests/test_numba_inspect.py tests/test_backend_contract.py -k numba

    step tune 60 "$PYTHON" -m numba_kernels.tune --models gpt2 --rows 1,8,16,64,1024
    step kernels 120 "$PYTHON" benchmarks/gpu_kernels.py
    step policies 90 "$PYTHON" benchmarks/gpu_policies.py --requests 40

    if [[ "$WORK" != "$ROOT" ]]; then  # the results, back into this checkout: the gpu sections alone
        (cd "$ROOT" && merge "$WORK/benchmarks/RESULTS.md")
        if [[ -f numba_kernels/tuning.json ]]; then cp numba_kernels/tuning.json "$ROOT/numba_kernels/tuning.json"; fi
    fi
    echo "=== done in $((SECONDS - START))s; failed: ${FAILED[*]:-none}"
} 2>&1 | tee "$LOG"

if [[ -n "${OUT:-}" ]]; then
    cp "$ROOT/benchmarks/RESULTS.md" "$OUT/RESULTS.md"
    if [[ -f "$ROOT/numba_kernels/tuning.json" ]]; then cp "$ROOT/numba_kernels/tuning.json" "$OUT/tuning.json"; fi
fi
grep -q "failed: none" "$LOG"
