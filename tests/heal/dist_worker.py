"""Run by test_heal_distributed.py, alone or under torchrun: heal a tiny checkpoint and record every
file write each rank makes (writes-rank<R>.json), keeping a copy of the mid-run training state."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import safetensors.torch
import torch

import compressor.surgery.edit
from compressor.heal.run import heal_checkpoint


def main(student: str, teacher: str, out: str, cache: str, batch_size: int) -> None:
    rank = int(os.environ.get("RANK", "0"))
    out = Path(out)
    record_dir = out.parent
    writes: list[str] = []
    torch_save, save_file, save_checkpoint = torch.save, safetensors.torch.save_file, compressor.surgery.edit.save_checkpoint

    def recording_torch_save(obj, path, *args, **kwargs):
        writes.append(f"state {Path(path).parent.name}")
        torch_save(obj, path, *args, **kwargs)
        shutil.copy(path, record_dir / f"state-{out.name}.pt")

    def recording_save_file(tensors, path, *args, **kwargs):
        writes.append("teacher-cache" if Path(path).name.startswith(".teacher-") else "weights")
        save_file(tensors, path, *args, **kwargs)

    def recording_save_checkpoint(model, tokenizer, path):
        writes.append("model")
        save_checkpoint(model, tokenizer, path)

    torch.save, safetensors.torch.save_file = recording_torch_save, recording_save_file
    compressor.surgery.edit.save_checkpoint = recording_save_checkpoint
    heal_checkpoint(student, teacher, out, seq_len=16, samples=16, eval_samples=4, teacher_cache=cache,
                    steps=4, checkpoint_every=2, batch_size=batch_size, lr=3e-3, warmup=1, alpha=0.7,
                    hidden_weight=0.5, train="all", autocast=False, overwrite=True)  # fp32: compared exactly
    (record_dir / f"writes-{out.name}-rank{rank}.json").write_text(json.dumps(writes))


if __name__ == "__main__":
    main(*sys.argv[1:5], int(sys.argv[5]))
