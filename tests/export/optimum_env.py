"""An isolated environment for Hugging Face Optimum's ORTModelForCausalLM (optimum-onnx 0.1 pins
transformers < 4.58; compressor runs a newer one), built once and cached.

The environment sees the main one's packages *after* its own (a .pth file appended to sys.path), so
it reuses torch, numpy and onnxruntime instead of downloading them, while its own transformers
shadows the main one. pip never removes packages outside the environment it installs into.

    python tests/export/optimum_env.py [FOLDER]    # (`make optimum-env`) prints the env's python

It lives in the clone, beside .venv (`.venv-optimum`, or COMPRESSOR_OPTIMUM_ENV): `make test` uses it
where it was built and skips the Optimum test otherwise (building it costs a minute or two of pip);
`make test-all` builds it first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REQUIREMENTS = ["optimum-onnx[onnxruntime]==0.1.0", "transformers<4.58"]
_STAMP = ".compressor-optimum"


def default_folder() -> Path:
    default = Path(__file__).resolve().parents[2] / ".venv-optimum"
    return Path(os.environ.get("COMPRESSOR_OPTIMUM_ENV", default)).expanduser()


def built(folder: Path | None = None) -> Path | None:
    """The environment's python if it has been built with the current requirements, else None."""
    folder = Path(folder or default_folder())
    stamp = folder / _STAMP
    if stamp.is_file() and stamp.read_text() == repr(REQUIREMENTS) and python_of(folder).exists():
        return python_of(folder)
    return None


def python_of(folder: Path) -> Path:
    return folder / "bin" / "python"


def ensure(folder: Path | None = None, timeout: int = 900) -> Path:
    """The environment's python, building it first when needed; raises RuntimeError when it cannot be built."""
    folder = Path(folder or default_folder())
    stamp = folder / _STAMP
    if built(folder) is not None:
        return python_of(folder)
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    py = python_of(folder)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    main_site = sysconfig.get_paths()["purelib"]
    Path(site, "zz-compressor-main.pth").write_text(f"import sys; sys.path.append({main_site!r})\n")
    done = subprocess.run([str(py), "-m", "pip", "install", "--quiet", *REQUIREMENTS],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pip could not build the Optimum environment: {done.stderr.strip()[-500:]}")
    stamp.write_text(repr(REQUIREMENTS))
    return py


if __name__ == "__main__":
    print(ensure(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
