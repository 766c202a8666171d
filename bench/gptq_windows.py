"""How many calibration windows int4 GPTQ needs: the unpruned model exported at fp32 and at int4 calibrated on
N windows of 256 tokens of the default text (`compress export --precision int4`, everything else its default),
in one run; each folder's perplexity from one independent ONNX Runtime loop (bench/int4.py's) on the first
--tokens tokens of wiki.test.txt and of the Python documentation, and the export's seconds.

    COMPRESSOR_BENCH_DATA=../shared/data .venv/bin/python bench/gptq_windows.py          # 64, 32, 16
    .venv/bin/python bench/gptq_windows.py --windows 64,48 --tokens 4096
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from int4 import perplexity  # bench/int4.py: the same ORT loop for every folder

DATA = Path(os.environ.get("COMPRESSOR_BENCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", default="64,32,16", help="comma-separated calibration window counts")
    p.add_argument("--tokens", type=int, default=8192, help="tokens scored of each text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "compressor-bench-gptq-windows")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import compressor.export.run as export_run
    from compressor.data import other_source, token_stream
    from compressor.loading import load_model

    model, tokenizer = load_model(args.model)
    wiki = tokenizer((DATA / "wiki.test.txt").read_text(), return_tensors="np").input_ids[0][: args.tokens]
    name, texts = other_source(None)
    docs = token_stream(tokenizer, texts[:400]).numpy()[: args.tokens]
    texts = {"wiki.test.txt": wiki.astype(np.int64), name: docs.astype(np.int64)}
    rows = []
    for windows in [0] + [int(w) for w in args.windows.split(",")]:  # 0: the fp32 reference
        export_run.CALIBRATION_WINDOWS = windows or export_run.CALIBRATION_WINDOWS
        out = args.work / (f"int4-{windows}" if windows else "fp32")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        start = time.perf_counter()
        summary = export_run.export_model(model, tokenizer, out, precision="int4" if windows else "fp32",
                                          validate=False)
        seconds = time.perf_counter() - start
        ppl = {t: perplexity(out, ids, args.threads) for t, ids in texts.items()}
        stats = (summary.quantization or {}).get("calibration_seconds")
        rows.append((windows, seconds, stats, ppl))
        print(f"{windows or 'fp32'}: export {seconds:.1f} s, " + ", ".join(f"{t} {v:.3f}" for t, v in ppl.items()),
              flush=True)
    fp32 = rows[0][3]
    print(f"\n{args.model}: int4 GPTQ by calibration windows (256 tokens, default text); perplexity on "
          f"{args.tokens} tokens of each text, change against fp32")
    print("| windows | export | statistics | " + " | ".join(texts) + " |")
    print("|---|---|---|" + "---|" * len(texts))
    for windows, seconds, stats, ppl in rows[1:]:
        print(f"| {windows} | {seconds:.1f} s | {stats:.1f} s | "
              + " | ".join(f"{ppl[t]:.3f} ({ppl[t] / fp32[t] - 1:+.1%})" for t in texts) + " |")


if __name__ == "__main__":
    main()
