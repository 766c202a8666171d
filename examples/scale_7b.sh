#!/usr/bin/env bash
# A 7B Llama (Llama-2-7B shape: 6.74B parameters, d = 4096, 32 blocks, vocab 32000) on one machine
# with 4 GPUs of 80 GB: calibrate and plan data-parallel, prune, heal with FSDP, export to ONNX.
#
#   MODEL=./llama-2-7b DATA=train.txt bash examples/scale_7b.sh
#
# Every memory figure below is an ESTIMATE from parameter counts and tensor shapes (bf16 weights 2 bytes
# per parameter; float64 Gram statistics 3 x d^2 x 8 bytes per block), not a measurement: none of these
# steps has been run at this size. Activations are rough upper bounds for the batch sizes used here.
set -euo pipefail

MODEL=${MODEL:-./llama-2-7b}     # a local Llama checkpoint (safetensors)
DATA=${DATA:-train.txt}          # calibration and training text (.txt, .jsonl or a directory of .txt)
WORK=${WORK:-./scale-7b}         # everything this script writes
GPUS=${GPUS:-4}
DROP=${DROP:-8}                  # blocks to remove (of 32)
mkdir -p "$WORK"

# 1. Calibrate, data-parallel: each rank profiles windows[rank::world]; the float64 statistics are
#    all-reduced, so every rank ends with the single-process profile (each rank uses cuda:LOCAL_RANK;
#    rank 0 writes).
#    Per GPU (estimate): weights 6.74e9 x 2 B = 13.5 GB + Gram statistics 3 x 4096^2 x 8 B = 0.40 GB
#    per block x 32 = 12.9 GB (held on the GPU while streaming) + activations of 8 windows x 2048
#    tokens, ~2-3 GB => ~29 GB. Host RAM: the statistics move to the CPU at the end, ~13 GB per rank.
torchrun --standalone --nproc_per_node "$GPUS" -m compressor calibrate "$MODEL" \
    --device cuda --dtype bfloat16 --data "$DATA" --samples 1024 --seq-len 2048 --batch-size 8 \
    --out "$WORK/profile" --overwrite

# 2. Plan, data-parallel: greedy (SLEB) or auto; each rank scores its share of the held-out windows
#    and streams its share of the fit windows, losses and normal equations are all-reduced in
#    float64, so all ranks take the same blocks; rank 0 writes plan.json and its maps.
#    auto profiles the model on the plan's windows first (or reuses a cached profile).
#    Per GPU (estimate): weights 13.5 GB; greedy adds the captured block inputs of its 2 held-out
#    windows (8 / 4 ranks) x 2048 tokens x 4096 x 2 B = 34 MB per block, ~1.1 GB for 32 blocks, and
#    the logits (~1 GB) => ~16 GB. auto adds up to 12 candidate normal equations x 2 x 4096^2 x 8 B
#    = 0.27 GB each (~3.2 GB) during the search => ~20 GB, and ~29 GB while it profiles (as step 1).
#    --device auto instead splits one process's model over the GPUs (accelerate device_map).
torchrun --standalone --nproc_per_node "$GPUS" -m compressor plan "$MODEL" \
    --drop "$DROP" --strategy auto --device cuda --dtype bfloat16 \
    --data "$DATA" --samples 256 --seq-len 2048 --out "$WORK/plan.json" --overwrite

# 3. Prune: one process on the CPU, weights in the checkpoint's dtype (~13.5 GB host RAM, estimate);
#    writes a standard checkpoint with 24 blocks (5.12e9 parameters, ~10.2 GB in bf16).
compress prune "$MODEL" --plan "$WORK/plan.json" --out "$WORK/pruned" --overwrite

# 4. Heal with FSDP (one shard unit per decoder block); only rank 0 writes. Per GPU (estimate):
#    the student's bf16 weights sharded 10.2 GB / 4 = 2.6 GB, plus one gathered block (0.4 GB),
#    gradients and AdamW moments of the trained blocks (--train touched: the blocks next to the
#    cuts) sharded, ~1-2 GB, activations of 1 window x 2048 tokens through 24 blocks, ~7 GB, and
#    the distillation logits, ~1 GB => ~12-14 GB. Rank 0 first runs the teacher once to cache its
#    top-64 log-probabilities: 13.5 GB of bf16 weights on GPU 0, freed before training.
#    Host RAM: each rank loads the student on the CPU first, ~10 GB per rank.
accelerate launch --multi_gpu --num_processes "$GPUS" -m compressor heal "$WORK/pruned" \
    --teacher "$MODEL" --data "$DATA" --distributed fsdp --dtype bfloat16 \
    --seq-len 2048 --batch-size 1 --grad-accum 4 --samples 2048 --steps 500 \
    --out "$WORK/healed" --overwrite

# 5. Export to ONNX with float16 weights (one process on the CPU; the model is loaded in float32:
#    5.12e9 x 4 B = 20.5 GB, and the export needs about as much again => ~40-60 GB host RAM,
#    estimate; ~10 GB of float16 weights on disk).
compress export "$WORK/healed" --format onnx --dtype float16 --out "$WORK/onnx" --overwrite
