"""`compress heal` as one library call: load, cut the text into windows, heal, write a checkpoint."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from compressor.data import hold_out
from compressor.errors import CompressorError, DataError
from compressor.heal.config import HealConfig, HealResult
from compressor.heal.distributed import launched_world_size
from compressor.heal.pair import check_teacher
from compressor.heal.train import heal
from compressor.util.io import atomic_dir, cache_dir, check_output

log = logging.getLogger(__name__)

HOLD_OUT = 0.1  # the last tenth of the text scores perplexity before and after healing


def heal_checkpoint(student: str | Path, teacher: str | Path, out: str | Path, *, data: Path | None = None,
                    eval_data: Path | None = None, seq_len: int = 256, samples: int = 512,
                    eval_samples: int = 32,
                    teacher_cache: str | Path = "auto", device: str = "cpu", dtype: str = "float32",
                    overwrite: bool = False, allow_pickle: bool = False, **settings) -> HealResult:
    """Heal the checkpoint `student` against `teacher` and write the result to `out` (rank 0 only).

    `settings` are HealConfig fields (steps, max_minutes, lr, train, ...). Training state goes to a
    hidden sibling of `out` (`.<name>.heal-state`), which `resume=True` continues from and which is
    removed once the healed model is written.
    """
    from compressor.data import load_texts
    from compressor.loading import load_model, resolve

    out = Path(out)
    check_output(out, overwrite)
    if device == "auto":
        raise CompressorError("heal does not take --device auto: for several GPUs launch it with "
                              "torchrun --nproc_per_node N (data parallel) and --distributed ddp|fsdp")
    for path in (data, eval_data):
        if path is not None and not Path(path).expanduser().exists():
            raise DataError(f"{path} does not exist: pass a .txt file, a .jsonl file, "
                            "or a directory of .txt files")
    _check_teacher_config(resolve(student), resolve(teacher))
    config = HealConfig(**settings, teacher_cache=_cache_dir(teacher_cache),
                        checkpoint_dir=out.parent / f".{out.name}.heal-state",
                        device=device if launched_world_size() <= 1 else None)
    config.validate()

    model, tokenizer = load_model(student, dtype=dtype, device="cpu", allow_pickle=allow_pickle)
    texts = load_texts(data)
    if eval_data is not None:
        train_texts, eval_texts = texts, load_texts(eval_data)
    elif eval_samples > 0:
        kept, held = hold_out(texts, HOLD_OUT)
        train_texts, eval_texts = [kept], [held]
    else:
        train_texts, eval_texts = texts, []
    train_windows, eval_windows = _windows(tokenizer, train_texts, eval_texts, samples, eval_samples,
                                           seq_len, config.seed)

    def load_teacher():
        loaded, _ = load_model(teacher, dtype=dtype, device="cpu", allow_pickle=allow_pickle,
                               with_tokenizer=False)
        return loaded

    joined = _group_exists()
    result = heal(model, load_teacher, train_windows, eval_windows, config)
    if result.is_main:
        with atomic_dir(out, overwrite) as tmp:
            if result.full_state_dict is not None:  # FSDP: the gathered weights, the model is sharded
                result.model.save_pretrained(tmp, state_dict=result.full_state_dict, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
            else:
                from compressor.surgery.edit import save_checkpoint

                save_checkpoint(result.model, tokenizer, tmp)
        shutil.rmtree(config.checkpoint_dir, ignore_errors=True)
    if not joined:
        _leave_together()
    return result


def _group_exists() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _leave_together() -> None:
    """Under torchrun, the process group healing joined: every rank waits for rank 0's write, then the group is
    torn down before the ranks exit. Left to interpreter exit, a rank of the two-rank test aborted once under
    load (SIGABRT, "terminate called without an active exception") after rank 0 had written the model."""
    import torch.distributed as dist

    if _group_exists():
        dist.barrier()
        dist.destroy_process_group()


def _cache_dir(teacher_cache: str | Path) -> Path | None:
    if str(teacher_cache) == "off":
        return None
    if str(teacher_cache) == "auto":
        return cache_dir("teacher-logits")
    return Path(teacher_cache).expanduser()


def _check_teacher_config(student_src, teacher_src) -> None:
    """Refuse a teacher of another vocabulary or width before loading either model's weights."""
    from transformers import AutoConfig

    try:
        s, t = (AutoConfig.from_pretrained(src) for src in (student_src, teacher_src))
    except (OSError, ValueError):
        return  # load_model reports unreadable models with its own, better message
    check_teacher(s, t)


def _windows(tokenizer, train_texts, eval_texts, samples, eval_samples, seq_len, seed):
    from compressor.data import make_windows, token_stream, windows_of

    train = make_windows(tokenizer, train_texts, samples, seq_len, seed)
    if eval_samples <= 0:
        return train, None
    stream = token_stream(tokenizer, eval_texts)
    if len(stream) < seq_len:
        log.warning("no held-out window of %d tokens: perplexity before/after is not measured", seq_len)
        return train, None
    return train, windows_of(stream, eval_samples, seq_len, seed + 1, at_most=True)
