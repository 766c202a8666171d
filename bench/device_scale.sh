#!/usr/bin/env bash
# On a GPU machine: calibration throughput (tokens/s) of a 1B-class Llama-shaped model with random
# weights in bf16, single process, and with every visible GPU under torchrun when there are several.
# Prints one JSON line per run. No downloads: the model is built from a config.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then echo "device_scale.sh needs a CUDA GPU" >&2; exit 2; fi
cat > /tmp/compressor_scale.py <<'PY'
import json, os, time, torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM
from compressor.calibrate import calibrate
if "RANK" in os.environ:
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000)  # TinyLlama-1.1B shape
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(dtype=torch.bfloat16, device="cuda").eval()
windows = torch.randint(0, config.vocab_size, (256, 1024))
calibrate(model, windows[:8], batch_size=8)  # warm-up
torch.cuda.synchronize(); start = time.perf_counter()
profile = calibrate(model, windows, batch_size=8)
torch.cuda.synchronize(); seconds = time.perf_counter() - start
world = dist.get_world_size() if dist.is_initialized() else 1
if not dist.is_initialized() or dist.get_rank() == 0:
    print(json.dumps({"gpus": world, "gpu": torch.cuda.get_device_name(), "tokens": windows.numel(),
                      "seconds": round(seconds, 2), "tokens_per_s": round(windows.numel() / seconds),
                      "tokens_per_s_per_gpu": round(windows.numel() / seconds / world),
                      "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}))
PY
$PY /tmp/compressor_scale.py
if [ "$GPUS" -gt 1 ]; then torchrun --nproc_per_node "$GPUS" /tmp/compressor_scale.py; fi
