"""Two gloo processes on the CPU, each with its shard of the windows, give the one-process profile."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model

from compressor.calibrate import Stats, calibrate

SETTINGS = {"batch_size": 2, "spans_max": 3, "intrinsic_dim": True, "twonn_points": 60, "exclude_outliers": 1.3}


def _windows() -> torch.Tensor:
    return torch.randint(3, 128, (5, 16), generator=torch.Generator().manual_seed(3))  # 5: uneven shards


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        profile = calibrate(tiny_model("llama"), _windows(), **SETTINGS)
        Path(out, f"profile{rank}.json").write_text(json.dumps(profile.to_dict()))
        profile.stats.save(Path(out, f"stats{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    # forked, not spawned: the ranks start with this process's imports instead of importing torch again
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    single = calibrate(tiny_model("llama"), _windows(), **SETTINGS)
    for rank in (0, 1):
        stats = Stats.load(tmp_path / f"stats{rank}.safetensors")
        assert sorted(stats.outliers) == sorted(single.stats.outliers)
        for a, b in zip(stats._tensors(), single.stats._tensors(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9)
        profile = json.loads((tmp_path / f"profile{rank}.json").read_text())
        assert profile["tokens"] == single.tokens == 5 * 16
        for got, want in zip(profile["blocks"], single.to_dict()["blocks"], strict=True):
            for key, value in want.items():
                if isinstance(value, float) and not math.isnan(value):
                    assert got[key] == pytest.approx(value, abs=1e-9), key


def _cli_calibrate(model_dir: Path, out: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from compressor.cli.calibrate import calibrate as calibrate_command

    app = typer.Typer()
    app.callback()(lambda: None)
    app.command(name="calibrate")(calibrate_command)
    result = CliRunner().invoke(app, ["calibrate", str(model_dir), "--out", str(out), "--samples", "5",
                                      "--seq-len", "16", "--batch-size", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _cli_worker(rank: int, world: int, out: str, model_dir: str, port: int) -> None:
    import os

    torch.set_num_threads(1)
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "COMPRESSOR_CACHE": str(Path(out, f"cache{rank}"))}
    _cli_calibrate(Path(model_dir), Path(out, "ranks"))


def test_cli_under_torchrun_joins_the_group_and_rank0_writes(tmp_path, monkeypatch):
    import socket

    from conftest import make_tokenizer

    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_cli_worker, args=(2, str(tmp_path), str(model_dir), port), nprocs=2, join=True,
                       start_method="fork")
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache-single"))
    _cli_calibrate(model_dir, tmp_path / "single")
    ranks = json.loads((tmp_path / "ranks" / "profile.json").read_text())
    single = json.loads((tmp_path / "single" / "profile.json").read_text())
    assert ranks["tokens"] == single["tokens"] == 5 * 16
    for got, want in zip(ranks["blocks"], single["blocks"], strict=True):
        assert got["linearity"] == pytest.approx(want["linearity"], abs=1e-9)
        assert got["block_influence"] == pytest.approx(want["block_influence"], abs=1e-9)
    assert not list(tmp_path.glob("cache1/**/*.json"))  # no rank wrote the profile cache
