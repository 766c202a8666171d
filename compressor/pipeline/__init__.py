"""`compress model` as a pipeline of stages, each with typed inputs, a typed result and a cache key
built from those inputs (see runner.py); run.py reads top to bottom."""

from compressor.pipeline.config import PipelineConfig, validate
from compressor.pipeline.run import run_pipeline, work_dir

__all__ = ["PipelineConfig", "run_pipeline", "validate", "work_dir"]
