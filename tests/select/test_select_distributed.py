"""Two gloo processes on the CPU, each scoring and fitting on its shard of the windows, make the
one-process plans: same blocks, same held-out losses, same maps (and `compress plan` under a
torchrun-style environment writes the plan it makes alone)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import typer
from conftest import make_tokenizer, tiny_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from compressor.calibrate import calibrate
from compressor.cli.plan import plan as plan_command
from compressor.select import SelectSettings, plan_blocks
from compressor.select.maps import FitSettings, fit_spans
from compressor.select.scoring import Scorer
from compressor.surgery.plan import read_plan

# 20 windows: 5 held out (3 + 2 per rank), 15 to fit on (8 + 7); batches of one window, so every
# window's forward is the same computation in one process and in two.
SETTINGS = SelectSettings(score_windows=5, batch_size=1, candidates=2, first_round=3, spans=2,
                          fit=FitSettings(batch_size=1))
TIMING = ("seconds", "select_seconds", "fit_seconds", "profile_seconds")


def _windows(n: int = 20) -> torch.Tensor:
    return torch.randint(3, 128, (n, 16), generator=torch.Generator().manual_seed(5))


def _results(model) -> tuple[dict, dict[str, torch.Tensor]]:
    """What one process (or each rank) computes: plans, losses and maps, as JSON and tensors."""
    ids, data, tensors = _windows(), {}, {}
    for strategy in ("greedy", "auto"):
        profile = calibrate(model, ids) if strategy == "auto" else None
        plan = plan_blocks(model, ids, 2, strategy, profile=profile, settings=SETTINGS)[2]
        data[strategy] = plan.to_dict() | {"cost": {k: v for k, v in plan.cost.items() if k not in TIMING}}
        replacements = {s - 1: plan.replacement(s, e) for s, e in plan.spans}
        data[f"{strategy} loss"] = Scorer(model, ids[:5], batch_size=1).loss(plan.drop, replacements)
        tensors |= {f"{strategy}/{k}": v for k, v in plan.maps.items()}
    # One window for two ranks: rank 1 has none, and still takes part in every reduction.
    one = Scorer(model, ids[:1], batch_size=1)
    states = one.capture({1}, None, [2], [0])
    data["one window"] = [one.loss({1}), one.loss_from({1, 2}, None, 3, states["h2"])]
    # Two spans: the second resumes from the first's replaced states, per rank's own batches.
    for n in (1, 3):
        fits = fit_spans(model, ids[:n], {1, 3}, [(1, 2), (3, 4)], FitSettings(batch_size=1))
        data[f"fit {n}"] = [f.provenance() for f in fits]
        tensors |= {f"fit {n}/{f.start}": f.replacement for f in fits}
    return data, {k: v.contiguous() for k, v in tensors.items()}


def _cli_plan(model_dir: Path, out: Path, device: str) -> None:
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command(name="plan")(plan_command)
    result = CliRunner().invoke(app, ["plan", str(model_dir), "--drop", "1", "--strategy", "greedy", "--out",
                                      str(out), "--samples", "8", "--seq-len", "16", "--device", device,
                                      "--dtype", "float32"], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _worker(rank: int, world: int, init_file: str, out: str, model_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    os.environ["COMPRESSOR_CACHE"] = str(Path(out, "cache-ranks"))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data, tensors = _results(tiny_model("llama"))
        Path(out, f"rank{rank}.json").write_text(json.dumps(data))
        save_file(tensors, Path(out, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()
    # `compress plan` as torchrun starts it: it joins the group itself and rank 0 writes.
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    _cli_plan(Path(model_dir), Path(out, "cli-ranks", "plan.json"), "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_make_the_one_process_plans(tmp_path, monkeypatch):
    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), str(model_dir), _free_port()),
                       nprocs=2, join=True, start_method="fork")

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache-single"))
    single, single_maps = _results(tiny_model("llama"))
    single = json.loads(json.dumps(single))  # tuples as the ranks wrote them
    assert single["greedy"]["provenance"]["held_out_windows"] == 5
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        maps = load_file(tmp_path / f"rank{rank}.safetensors")
        assert set(got) == set(single)
        for key, want in single.items():
            if isinstance(want, float) or key == "one window":
                assert got[key] == pytest.approx(want, rel=1e-9), key
            else:
                assert got[key] == want, key  # blocks, spans, forms, token counts, rounded losses
        assert set(maps) == set(single_maps)
        for key, want in single_maps.items():
            torch.testing.assert_close(maps[key], want, rtol=1e-8, atol=1e-8, msg=key)

    # The CLI: under WORLD_SIZE=2 (gloo, --device cpu) and alone with --device auto.
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache-cli"))
    _cli_plan(model_dir, tmp_path / "cli-single" / "plan.json", "auto")
    ranks, alone = read_plan(tmp_path / "cli-ranks" / "plan.json"), read_plan(tmp_path / "cli-single" / "plan.json")
    assert ranks.drop == alone.drop and ranks.linearize == alone.linearize
    for key, want in alone.maps.items():
        torch.testing.assert_close(ranks.maps[key], want, rtol=1e-4, atol=1e-5)
