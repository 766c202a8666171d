"""Distributed healing (torchrun, gloo, 2 CPU processes) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer
from heal_fixtures import pair
from safetensors.torch import load_file

from compressor.heal.run import heal_checkpoint
from compressor.surgery.edit import save_checkpoint

WORKER = Path(__file__).with_name("dist_worker.py")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.fixture
def checkpoints(tmp_path):
    teacher, student = pair(drop=(1,))
    save_checkpoint(teacher, make_tokenizer(), tmp_path / "teacher")
    save_checkpoint(student, make_tokenizer(), tmp_path / "student")
    return tmp_path


def run_worker(tmp: Path, out: str, cache: str, batch_size: int, nproc: int):
    cmd = [sys.executable, str(WORKER), str(tmp / "student"), str(tmp / "teacher"), str(tmp / out),
           str(tmp / cache), str(batch_size)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, env=env, cwd=tmp)
    assert run.returncode == 0, run.stderr[-3000:]


def test_two_ranks_equal_one_process_and_only_rank_0_writes(checkpoints):
    tmp = checkpoints
    run_worker(tmp, "dist", "cache-dist", batch_size=2, nproc=2)
    heal_checkpoint(tmp / "student", tmp / "teacher", tmp / "single", seq_len=16, samples=16, eval_samples=4,
                    teacher_cache=tmp / "cache-single", steps=4, checkpoint_every=2, batch_size=4, lr=3e-3,
                    warmup=1, alpha=0.7, hidden_weight=0.5, train="all", autocast=False)
    single, dist = weights(tmp / "single"), weights(tmp / "dist")
    for name, value in single.items():
        torch.testing.assert_close(dist[name], value, rtol=1e-4, atol=2e-5, msg=name)  # Adam magnifies sum-order noise

    writes = [json.loads((tmp / f"writes-dist-rank{r}.json").read_text()) for r in (0, 1)]
    assert writes[1] == []
    assert writes[0] == ["teacher-cache", "state .dist.heal-state", "model", "weights"]
    assert not (tmp / ".dist.heal-state").exists()  # removed once the model is written

    # The state rank 0 saved at step 2 of 4 resumes in one process (same global batch of 4).
    state_dir = tmp / ".resumed.heal-state"
    state_dir.mkdir()
    shutil.copy(tmp / "state-dist.pt", state_dir / "state.pt")
    result = heal_checkpoint(tmp / "student", tmp / "teacher", tmp / "resumed", seq_len=16, samples=16,
                             eval_samples=4, teacher_cache=tmp / "cache-single", steps=4, checkpoint_every=2,
                             batch_size=4, lr=3e-3, warmup=1, alpha=0.7, hidden_weight=0.5, train="all",
                             autocast=False, resume=True)
    assert result.resumed_from == 2
    resumed = weights(tmp / "resumed")
    for name, value in single.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-4, atol=2e-5, msg=name)  # Adam magnifies sum-order noise
