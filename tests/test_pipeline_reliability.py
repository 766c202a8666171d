"""`compress model` keeps the user's work: late failures, Ctrl-C and SIGTERM keep the work directory and
say how to resume, stage results are keyed by content, and probe exports by the model they hold."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import tiny_model

from compressor.errors import CompressorError

API_FAST = {"backend": "torch", "threads": 1, "prefill_tokens": 32, "new_tokens": 8, "samples": 8, "seq_len": 32,
            "timing_seconds": 0.2, "format": "none"}
CLI_FAST = ["--workload", "1x32+8", "--samples", "8", "--seq-len", "32", "--backend", "torch", "--threads", "1",
            "--min-seconds", "0.2", "--format", "none"]


def test_a_late_error_keeps_the_work_and_the_rerun_resumes(tiny_dir, tmp_path, caplog):
    """A failure after healing (here raised as the final benchmark starts, the seam a builder or validation
    failure would hit) used to delete everything. The work directory stays, with the healed checkpoint,
    the error says where and how to resume, and the rerun skips the finished stages."""
    import compressor
    from compressor.util.progress import use_tracker

    out, work = tmp_path / "run", tmp_path / ".run.work"
    settings = dict(target_speedup=1.05, out=out, heal_steps=2, **API_FAST)

    def fail_late(message):
        if message.startswith("benchmarking original and compressed"):
            raise CompressorError("the builder failed")

    with pytest.raises(CompressorError) as raised, use_tracker(lambda items, total, description: items,
                                                               on_status=fail_late):
        compressor.compress(tiny_dir, **settings)
    message = str(raised.value)
    assert message.startswith("the builder failed") and str(work) in message and "rerun" in message
    assert not out.exists() and (work / "model" / "config.json").is_file()
    assert {"profile.stage.json", "blocks.stage.json", "plan.stage.json"} <= {p.name for p in work.iterdir()}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="compressor"):
        report = compressor.compress(tiny_dir, **settings)
    assert "resuming: profile" in caplog.text and "resuming: plan" in caplog.text
    assert report.target_met is not None and (out / "report.json").is_file() and not work.exists()


def test_bad_input_before_the_first_stage_leaves_nothing(tmp_path):
    import compressor

    out = tmp_path / "run"
    with pytest.raises(CompressorError):
        compressor.compress(tmp_path / "no-such-model", target_speedup=1.2, out=out, **API_FAST)
    assert list(tmp_path.iterdir()) == []


# The child resets SIGINT first: a job a non-interactive shell starts in the background (make, CI) inherits
# SIGINT as *ignored*, neither make nor Popen resets that, and Python then never raises KeyboardInterrupt.
RESET_SIGINT = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
LAUNCH = RESET_SIGINT + "import sys; sys.argv[0] = 'compress'; from compressor.cli import main; main()\n"


def test_the_child_process_sees_sigint_as_python_expects():
    """If this fails, the environment, not compressor, is why the signal tests below cannot work."""
    probe = subprocess.run([sys.executable, "-c", RESET_SIGINT + "print(signal.getsignal(signal.SIGINT))"],
                           capture_output=True, text=True, timeout=60, check=True)
    assert "default_int_handler" in probe.stdout, probe.stdout


def test_a_signal_keeps_the_work_directory_and_says_where(tiny_dir, tmp_path):
    """Ctrl-C during healing, then SIGTERM during the rerun's healing (the rerun resumes from the stages the
    first run finished): each exits 130, keeps the work directory and says how to resume."""
    out, work = tmp_path / "run", tmp_path / ".run.work"
    args = [tiny_dir, "--target-speedup", "1.05", "--out", out, *CLI_FAST,
            "--heal-steps", "100000", "--heal-minutes", "10"]  # healing outlasts the wait below
    for sig in (signal.SIGINT, signal.SIGTERM):
        process = subprocess.Popen([sys.executable, "-c", LAUNCH, "model", *map(str, args)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(300, process.kill)  # a run that neither heals nor ends fails, not hangs
        watchdog.start()
        try:
            before = []
            for line in process.stderr:  # the log, line by line, until healing starts (or the process ends)
                before.append(line)
                if "healing (" in line:
                    break
            assert process.poll() is None, "".join(before) + process.communicate()[1]
            time.sleep(1.0)  # into the training steps
            process.send_signal(sig)
            stderr = "".join(before) + process.communicate(timeout=120)[1]
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 130, stderr
        assert "interrupted" in stderr and str(work) in stderr and "resume" in stderr, stderr
        assert "Aborted" not in stderr and "Traceback" not in stderr
        assert work.is_dir() and (work / "plan.stage.json").is_file() and not out.exists()
        assert ("resuming: plan" in stderr) == (sig == signal.SIGTERM), stderr  # the rerun resumed


def test_stage_keys_follow_the_content_of_the_files_they_name(tmp_path):
    import os
    from dataclasses import replace

    from compressor.pipeline import PipelineConfig
    from compressor.pipeline.calibrate import profile_inputs
    from compressor.pipeline.runner import key_of

    text = tmp_path / "train.txt"
    text.write_text("alpha beta gamma")
    cfg = PipelineConfig(target_speedup=1.2, data=text)
    before = key_of(profile_inputs(cfg))
    assert key_of(profile_inputs(cfg)) == before
    text.write_text("alpha beta delta!")  # edited in place: same path
    os.utime(text, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert key_of(profile_inputs(cfg)) != before
    assert key_of(profile_inputs(replace(cfg, data=None))) != before


def test_a_checkpoint_changed_in_place_starts_a_fresh_work_directory(tmp_path, tiny_dir):
    from compressor.pipeline.runner import Runner

    runner = Runner(tmp_path / "work")
    runner.prepare(str(tiny_dir), {})
    (runner.work / "profile.stage.json").write_text("{}")
    runner.prepare(str(tiny_dir), {})
    assert (runner.work / "profile.stage.json").exists()  # same model: the work is reused
    tiny_model("llama", seed=5).save_pretrained(tiny_dir)  # new weights at the same path
    runner.prepare(str(tiny_dir), {})
    assert not (runner.work / "profile.stage.json").exists()


def test_a_probe_export_is_reused_only_for_the_model_it_holds(tmp_path):
    """Probe folders are named probe-original, probe-K...: a rerun with another model under the same name
    must not time the old file."""
    pytest.importorskip("onnxruntime")
    from conftest import make_tokenizer

    from compressor.pipeline import PipelineConfig
    from compressor.pipeline.measure import backend_for
    from compressor.pipeline.runner import Run, Runner

    def llama(seed):  # head size 16: the builder route, as for most users
        return tiny_model("llama", head_dim=16, num_hidden_layers=2, seed=seed)

    run = Run(PipelineConfig(target_speedup=1.2, threads=1), Runner(tmp_path), llama(0), make_tokenizer())
    backend_for(run, run.model, "probe-x").close()
    first = (tmp_path / "probe-x" / "export.json").stat().st_mtime_ns
    backend_for(run, run.model, "probe-x").close()  # the same model: reused
    assert (tmp_path / "probe-x" / "export.json").stat().st_mtime_ns == first
    other = llama(3)
    ids = torch.tensor([[5, 6, 7]])
    with backend_for(run, other, "probe-x") as backend:
        logits = backend.logits(ids)
    assert (tmp_path / "probe-x" / "export.json").stat().st_mtime_ns != first
    with torch.no_grad():
        torch.testing.assert_close(logits, other(ids).logits, atol=1e-4, rtol=1e-4)
