#!/usr/bin/env bash
# The GPU check: one short run on a lent GPU machine (at most about 8 minutes on one H100).
#
#   scripts/gpu_check.sh            # on the GPU machine, from the repository root
#
# 1. the stack: GPU, driver, torch, transformers (written to env.json);
# 2. the test suite's CUDA-marked tests (tests/test_cuda.py): variable-width and replaced experts in bf16
#    against the stock experts, training steps, recovery, a calibration across the GPU and the CPU;
# 3. benchmarks/speed.py --quick on cuda/bf16 at the four real layer shapes (random weights);
# 4. the vLLM serve check (benchmarks/serve.py), where vLLM is installed there (the lent machines have no
#    network and vLLM's CUDA wheels exceed what a call may carry, so today it says it was skipped).
#
# Every result goes under benchmarks/results/gpu/ (and into $OUT when the device tool runs it, so the files
# come back). Nothing is installed over the machine's own torch: moetrim runs from src/ (its other needs,
# transformers, accelerate, peft, safetensors, typer, rich and matplotlib, are in the GPU image; wheels carried
# in .whl/ are installed to /tmp/site first). Each step has its own time limit; a failed step does not stop
# the next, and the script exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=benchmarks/results/gpu
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && \
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
failed=0
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $RES/NAME.log, remember a failure
  local name=$1 limit=$2; shift 2
  echo "== $(date +%T) $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$RES/$name.log"
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || failed=1
}

step env 60 python3 - <<'EOF'
import json, os, platform, subprocess
import torch, transformers
info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "capability": list(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None,
        "grouped_mm": hasattr(torch.nn.functional, "grouped_mm"), "cpus": os.cpu_count()}
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as exc:  # no nvidia-smi: say so rather than stop
    info["driver"] = f"unknown ({exc})"
import moetrim
info["moetrim"] = moetrim.__version__
json.dump(info, open("benchmarks/results/gpu/env.json", "w"), indent=1)
print(json.dumps(info))
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device visible to torch: nothing below can measure a GPU")
EOF
step cuda_tests 180 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
step speed 300 python3 benchmarks/speed.py --quick --device cuda --dtype bfloat16 --no-fail --out "$RES/speed.json"
if python3 -c "import vllm" > /dev/null 2>&1; then
  step serve 240 python3 benchmarks/serve.py --out "$RES/serve.json"
else
  echo "vLLM is not installed on this machine: the serve check was skipped" | tee "$RES/serve.log"
fi
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp "$RES"/*.json "$RES"/*.log "$RES"/*.png "$OUT"/ 2> /dev/null
fi
echo "results in $RES (failed steps: $failed)"
exit "$failed"
