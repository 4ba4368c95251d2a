#!/usr/bin/env bash
# GPU acceptance check, for a machine with a CUDA GPU and no model hub (nothing is downloaded but
# the Python packages). From the repository root:
#
#     bash benchmarks/gpu_check.sh            # OUT=runs/gpu_check PYTHON=python3 by default
#
# 1. installs as the README's set-up does: torch 2.13.0 first (PyPI's Linux wheel is the CUDA
#    build), then the project with its dev extras; no torchvision;
# 2. runs the world demo (`unlearn demo`: GA and FTTP on the world MLLM, traced with attention) on
#    CUDA and checks that its runs trained there (the loop's bf16 autocast, which it uses on CUDA only);
# 3. benchmarks/real_shapes.py at full depth on CUDA: the LLaVA-1.5-7B-shaped model in bf16 with
#    LoRA, FTTP, 10 traced and 10 untraced steps (and 10 bare ones), the attention probe, and the
#    log-prob gather at Qwen's vocabulary; then SD-1.4's UNet, the toolkit's default full fine-tuning
#    (float32 weights, bf16 autocast), FTTP, 20 steps (10 traced, 10 untraced) and 10 bare ones.
#    Each prints seconds per step, peak GPU memory (torch.cuda.max_memory_allocated) and the
#    tracing ratios, one `name: value` line each;
# 4. the SD forgetting audit (`unlearn audit`) of a world SD run on CUDA, `--retain-model` a pipeline
#    directory (the world SD standing in: plumbing and device, not a verdict), every attack, seconds.
#
# Any failure stops the script with a non-zero exit status and the failing command on stderr.
set -Eeuo pipefail
trap 'echo "gpu_check: FAILED (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"

echo "== install"
"$PY" -m pip install torch==2.13.0
"$PY" -m pip install -e ".[dev]"
if "$PY" -c "import torchvision" 2>/dev/null; then
  echo "gpu_check: torchvision is installed; the toolkit is checked without it: pip uninstall -y torchvision" >&2
  exit 1
fi
"$PY" - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"gpu_check: torch {torch.__version__} sees no CUDA device (a CPU-only build, or no driver)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF

echo "== world demo on CUDA"
"$PY" -m unlearn.cli demo --out "$OUT/demo" --quiet
"$PY" - "$OUT/demo" <<'EOF'
import json, sys
from pathlib import Path
for method in ("ga", "fttp"):
    m = json.loads((Path(sys.argv[1]) / method / "manifest.json").read_text())
    state = m.get("state", "complete")  # a finished run's manifest may leave the state out
    if state != "complete" or m.get("mixed_precision") != "bf16":
        raise SystemExit(f"gpu_check: demo run {method}: state {state!r}, mixed precision "
                         f"{m.get('mixed_precision')!r}; expected a complete run trained on CUDA (bf16)")
    print(f"demo {method}: complete, trained on CUDA (bf16 autocast), train {m['timings_seconds']['train']:.1f} s")
EOF

echo "== LLaVA-1.5-7B-shaped, full depth, bf16, LoRA, FTTP; log-prob gather at vocab 152064"
"$PY" benchmarks/real_shapes.py --part vocab mllm --device cuda --dtype bf16 --full-depth --batch 2 \
  --repeats 10 --probe-repeats 5 2>&1 | tee "$OUT/mllm.txt"

echo "== SD-1.4 UNet, 64x64 latents, full fine-tuning, FTTP"
"$PY" benchmarks/real_shapes.py --part sd --device cuda --dtype fp32 --sd-train full --batch 2 \
  --repeats 10 --probe-repeats 5 2>&1 | tee "$OUT/sd.txt"

echo "== the SD forgetting audit on CUDA: a world SD run, every attack (small budgets), the three models on the GPU"
"$PY" -m unlearn.cli sd --concept grom --method fttp --steps 20 --images 5 --out "$OUT/sd-audit-run" --overwrite --quiet
# the world SD itself as the --retain-model (a pipeline directory, as a user gives one): no retain build here
WORLD_SD=$("$PY" -c 'from unlearn.world.source import resolve_model; print(resolve_model("world", "sd"))')
"$PY" -m unlearn.cli audit "$OUT/sd-audit-run" --retain-model "$WORLD_SD" --quiet --set sampling.seeds=8 --set inversion.steps=50 \
  --set adversarial.steps=10 2>&1 | tee "$OUT/sd-audit.txt"
"$PY" - "$OUT/sd-audit-run" <<'EOF'
import json, sys
from pathlib import Path
report = json.loads((Path(sys.argv[1]) / "audit" / "audit.json").read_text())
if report["models"] != ["original", "unlearned", "retain"] or len(report["attacks"]) != 5:
    raise SystemExit(f"gpu_check: SD audit: models {report['models']}, attacks {sorted(report['attacks'])}")
print(f"sd audit on CUDA: {report['overall']['verdict']}, "
      + ", ".join(f"{a} {v['verdict']}" for a, v in report["attacks"].items())
      + f"; {report['timings_seconds']['total']:.0f} s")
EOF

echo "gpu_check: OK (figures in $OUT/mllm.txt, $OUT/sd.txt and $OUT/sd-audit.txt)"
