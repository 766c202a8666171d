"""Weight-only int4/int8 quantization of ONNX graphs for ONNX Runtime CPU (MatMulNBits).

`quantize_onnx(src, dst, QuantConfig(...), calibration=windows)` replaces every MatMul with a
constant weight by a MatMulNBits node (block-wise along the input dimension) and the token
embedding Gather by GatherBlockQuantized (`embedding`: a tied table is read from the quantized
lm_head's own integers, no second copy). Calibration statistics are measured on the fp32 graph
itself (`measure_hessians`), so they fit whatever exporter wrote it; graphs over protobuf's 2 GB
limit go through external data (`protos`).

Grids (`blockwise`): ORT's "symmetric" and "asymmetric" ones are quantized by ONNX Runtime's own
quantizer (the C++ kernels behind MatMulNBitsQuantizer and the builder); "minmax" (each block's
own range, float zero points: llama.cpp's Q4_1) is ours. Algorithms: "rtn" (round to nearest),
"mse" (per block, the range shrink that minimises the activation-weighted squared error
sum_k E[x_k^2] (w_k - dq_k)^2; needs only per-channel mean squares, one forward pass per window),
"gptq" (error feedback through the full input Hessian). Mixed precision: keep_int8="lm_head" keeps
the output projection 8-bit (and with it a tied embedding); "auto" also keeps the MatMuls with the
largest calibrated output error 8-bit, up to int8_fraction of the weights (`mixed`).

Measured on SmolLM2-135M (ORT 1.32, 2 threads, first 16,384 tokens of wiki.test.txt, strided
512/256, one ORT loop; fp32 17.615; calibration 64 x 256 tokens of the bundled text; sizes are whole
folders with the 3.5 MB tokenizer, 10^6 bytes; seconds on a shared, busy 2-core machine):

| int4 variant (block 32; "head" = lm_head 8-bit, shared with the embedding) | perplexity | size MB |
|-----------------------------------------------------------------|------------|---------|
| builder int4 k_quant_mixed (29 MatMuls + head int8, int8 embedding)| +12.9% (issue 23) | 117.2 |
| before issue 23: symmetric mse, head int8, fp32 embedding       | +18.9%     | 208     |
| symmetric mse, head                                             | +16.8%     | 104.2   |
| asymmetric mse, head + 25% of the weights int8 by sensitivity   | +14.2%     | 115.2   |
| asymmetric gptq, head + 25% int8 by sensitivity (before act-order) | +7.8%      | 115.2   |
| the same, act-order with static groups                           | +5.6%      | 115.3   |
| minmax rtn, head (block 32)                                     | -0.07%     | 117.5   |
| minmax mse, head (block 64)                                     | +0.08%     | 115.7   |

SmolLM2's checkpoint is a dequantized Q4_1 GGUF (Q8_0 embedding): every block of 32 inputs holds
16 levels min + d * q, so the minmax grid gives the checkpoint back exactly; what is left is
accuracy_level 4's int8 rounding of the activations (+-0.1%). But it needs float zero points, and
ONNX Runtime 1.32's CPU MatMulNBits has no fast kernel for them: one 576 x 1536 MatMul took 4-5 ms
per decoded token against 0.11-0.15 ms with integer zero points (at every accuracy level). So
"minmax" is an option, not the default. On ORT's integer grid the Q4_1 levels are off by a constant
per block (up to half a step), which GPTQ can compensate and rounding cannot. GPTQ's Hessians clip
each token to 4x the median token norm (calibration.clip_token_norms): unclipped, SmolLM2's massive
first token owns them and GPTQ lost to plain rounding (+41.8% against +28.2% before issue 23).
The default costs full Hessians: 263 s of calibration and 102 s of GPTQ on the busy machine (the
diagonal statistics that "mse" needs took 52 s), over the 2-minute goal there. "auto" = "gptq" for
4-bit given calibration windows, "rtn" otherwise (8-bit round to nearest is within 1% already).
bench/int4.py prints the side-by-side table.

GPTQ act-order (issue 23; one process, 1 thread, Hessians measured once per text and reused, the
same perplexity loop; "wiki" = calibrated on wiki.train.txt, held out from the wiki.test.txt score):

| gptq variant, head + int8 by sensitivity (block 32, int8 block 64)    | bundled | wiki  | size MB |
|-----------------------------------------------------------------------|---------|-------|---------|
| input order, grid from the updated weights, 25% int8                   | +7.8%   | +6.4% | 115.3   |
| act-order, static groups (each block's ORT grid of the original weights)| +5.6%   | +5.2% | 115.3   |
| act-order, damping 1% of the median diagonal instead of the mean       |         | +5.8% | 115.2   |
| act-order, int8 chosen by full-Hessian output error (not its diagonal) |         | +9.2% | 115.3   |
| act-order, static grid range-searched per block (rtn_search, H diagonal)|         | +7.0% | 115.2   |
| act-order, damping 3% of the mean diagonal (not 1%)                   |         | +5.0% | 115.2   |
| act-order, 18% int8                                                    |         | +5.7% | 112.1   |
| act-order, 17% int8                                                    |         | +5.6% | 111.7   |
| act-order, 17% int8, damping 10%                                       |         | +5.6% | 111.7   |
| act-order, 17% int8, damping 3%  (the default before AWQ)              | +5.8%   | +5.5% | 111.7   |
| act-order, int4 block 64, 28.5% int8                                   |         | +7.3% | 111.5   |
| act-order, 22% int8 at int8 block 128 (576 inputs pad to 640)         |         | +5.7% | 117.9   |
| act-order, 17% int8, damping 3%, + AWQ scales (= the default, below)  | +4.8%   | +5.3% | 111.7 |
| the same, AWQ left off the MatMuls kept 8-bit                          | +4.8%   | +5.5% | 111.7 |
| the same, AWQ also v -> o through GroupQueryAttention, not on 8-bit    | +5.1%   | +5.5% | 111.7 |
| AWQ before the 8-bit choice (chosen on the scaled weights)             |         | +7.0% | 111.7 |
| 8-bit chosen by round-to-nearest's error instead of GPTQ's             |         | +6.0% | 111.6 |
| lm_head and embedding 4-bit, 43% of the rest 8-bit                     |         | +7.2% | 111.5 |

Act-order (rows by decreasing Hessian diagonal, each block's scale and zero point fixed beforehand
from its original weights, so the MatMulNBits layout is unchanged) is the default: it won on both
calibration texts, at the same size and GPTQ time (24-38 s for all 151 MatMuls on one thread).
The default spends 17% of the weights on int8 (not 25%), which fits the folder in 112 MB, and damps
by 3% of the mean diagonal (better than 1% and 10% there). bench/int4.py --data wiki.train.txt
--threads 1 gave the same +5.5% (18.578 against 17.615) and 111.7 MB: 93 s to quantize, of which
65 s calibration (ORT's own 2 threads) and the rest GPTQ (torch, 1 thread) and writing. Issue 23's
+5% is not reached at 112 MB; it was at 115.2 MB (+5.0%, 25% int8, damping 3%).

AWQ (compressor.quantize.awq): per-input-channel scales from the calibrated mean squares, alpha
searched per input on the Hessian, folded into the RMSNorm before qkv and gate/up and into up
before down, so the graph is unchanged in size and speed. It runs after the 8-bit choice (made on
plain GPTQ): chosen on the scaled weights, the o projections, which take no scales, look worst and
take the 8-bit budget (+7.0%). With it the default gives +4.8% (bundled) / +5.3% (wiki) at 111.7 MB;
it costs a second GPTQ pass and the search (about 40 s more on one thread).
bench/results/int4-smollm2.txt has every run.
"""

from compressor.quantize.calibration import Hessians, input_hessians
from compressor.quantize.config import QuantConfig, QuantConfigError, QuantSummary
from compressor.quantize.graph import measure_hessians, quantize_onnx

__all__ = ["Hessians", "QuantConfig", "QuantConfigError", "QuantSummary", "input_hessians", "measure_hessians",
           "quantize_onnx"]
