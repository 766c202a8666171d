"""Would scoring plans with quantized weights predict the deployed model better? (issue 20)

`compress model` estimates a plan at a quantized precision as the plan's training-free fp32 perplexity times
that precision's measured quantize-only ratio (`pipeline.precision.estimated`). For plans removing each of
--depths blocks (auto, on the run's calibration windows; no healing), this prints, per evaluation text:

- estimate: the plan's fp32 perplexity x the quantize-only ratio (the unpruned int4 export over fp32);
- fake-quantized: the plan scored with every Linear's weight rounded to nearest on ORT's int4 grid in torch
  (`quantize.fake`: what scoring with quantized weights costs no more than an fp32 score);
- deployed: the plan's int4 export as `compress model` delivers it (GPTQ, 8-bit by sensitivity), through ONNX
  Runtime;

and the error of each predictor against deployed. All in one run, on the texts `compress model` scores.

    python bench/quantized_scoring.py --depths 2,4,6
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--depths", default="2,4,6")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--data", type=Path, default=None, help="calibration text (default: the bundled one)")
    args = parser.parse_args()

    from compressor.calibrate import calibrate
    from compressor.evaluate.backends import get_backend
    from compressor.export.run import export_model
    from compressor.loading import load_model, resolve
    from compressor.pipeline.config import PipelineConfig
    from compressor.pipeline.data import load_data, perplexities
    from compressor.select import plan_blocks
    from compressor.surgery.plan import applied_copy

    depths = [int(d) for d in args.depths.split(",")]
    model, tokenizer = load_model(resolve(args.model))
    data = load_data(PipelineConfig(data=args.data, eval_max_tokens=args.eval_tokens, heal_steps=0), tokenizer)
    start = time.perf_counter()

    def deployed(m, work: Path) -> dict:
        out = work / f"int4-{len(list(work.iterdir()))}"
        out.mkdir()
        export_model(m, tokenizer, out, precision="int4", validate=False, data=args.data)
        backend = get_backend("onnxruntime", out, device="cpu")
        try:
            return perplexities(backend, data.evaluation)
        finally:
            backend.close()

    with tempfile.TemporaryDirectory(prefix="qscore-") as tmp:
        work = Path(tmp)
        fp32 = perplexities(model, data.evaluation)
        int4 = deployed(model, work)
        ratio = {n: int4[n] / fp32[n] for n in fp32}
        search = plan_blocks(model, data.calibration, depths, "auto", profile=calibrate(model, data.calibration))
        rows = []
        for k in [0, *depths]:
            m = model if k == 0 else applied_copy(model, search[k])
            plain = fp32 if k == 0 else perplexities(m, data.evaluation)
            rows.append((k, plain, {n: plain[n] * ratio[n] for n in plain}, perplexities(fake_quantized(m), data.evaluation),
                         int4 if k == 0 else deployed(m, work)))

    print(f"{args.model}: int4 predictors of the deployed int4 export's perplexity, training-free plans (auto); "
          f"{args.eval_tokens} tokens per text; {time.perf_counter() - start:.0f} s")
    errors = {"estimate": [], "fake-quantized": []}
    for name in fp32:
        print(f"\n{name}\n| blocks removed | fp32 | estimate (fp32 x ratio) | fake-quantized | deployed int4 | "
              "estimate error | fake error |\n|---|---|---|---|---|---|---|")
        for k, plain, est, fake, dep in rows:
            e, f = est[name] / dep[name] - 1, fake[name] / dep[name] - 1
            if k:
                errors["estimate"].append(abs(e))
                errors["fake-quantized"].append(abs(f))
            print(f"| {k} | {plain[name]:.3f} | {est[name]:.3f} | {fake[name]:.3f} | {dep[name]:.3f} | {e:+.1%} | {f:+.1%} |")
    print("\nmean absolute error over the pruned plans: " + ", ".join(
        f"{what} {sum(v) / len(v):.1%}" for what, v in errors.items()))
    return 0


def fake_quantized(model):
    """A copy of `model` with every Linear's weight rounded to nearest on ORT's default int4 grid (asymmetric,
    block 32) and the output projection on its 8-bit symmetric grid, as the export's defaults keep it."""
    import torch

    from compressor.quantize.config import QuantConfig
    from compressor.quantize.fake import fake_quantize

    config = QuantConfig()
    out = copy.deepcopy(model)
    head = out.get_output_embeddings()
    with torch.no_grad():
        for module in out.modules():
            if isinstance(module, torch.nn.Linear):
                bits = 8 if module is head else 4
                module.weight.copy_(fake_quantize(module.weight, bits, config.block_for(bits), config.resolved_grid(bits)))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
