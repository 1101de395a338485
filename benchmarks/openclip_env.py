"""A separate virtual environment with OpenCLIP, for side-by-side benchmarks.

OpenCLIP needs torchvision, which does not import beside cliplab's CPU torch, so benchmarks run
OpenCLIP in its own environment: ``python -m venv`` + ``pip install open-clip-torch`` with a
torch/torchvision pair that imports together on this kind of machine (x86_64: torch 2.14.1 +
torchvision 0.29.1, a CUDA build of several GB; aarch64: 2.9.1 + 0.24.1, a CPU build), once.
The environment is kept under a cache folder and reused; a finished one is marked by a stamp
file, so an interrupted install is simply resumed by the next call.

    from openclip_env import openclip_python
    python = openclip_python()          # Path to its interpreter, or None (reason printed)
    subprocess.run([str(python), "my_openclip_script.py"])

Or from the shell, to build it ahead of time: ``python benchmarks/openclip_env.py [--dir DIR]``.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import venv
from pathlib import Path

PACKAGE = "open-clip-torch"
# OpenCLIP's HFTokenizer (text_cfg.hf_tokenizer_name, local-dir: models) needs transformers
EXTRAS = ["transformers"]
# torch/torchvision pairs seen to import together (PyPI's torchvision fails beside torch 2.13 CPU)
TORCH_PAIRS = {"x86_64": ["torch==2.14.1", "torchvision==0.29.1"],
               "aarch64": ["torch==2.9.1", "torchvision==0.24.1"]}
STAMP = ".cliplab-openclip-ready"


def default_env_dir() -> Path:
    """``$CLIPLAB_OPENCLIP_ENV``, else ``$XDG_CACHE_HOME/cliplab/openclip-env`` (~/.cache/...)."""
    if os.environ.get("CLIPLAB_OPENCLIP_ENV"):
        return Path(os.environ["CLIPLAB_OPENCLIP_ENV"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "cliplab" / "openclip-env"


def _env_python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _imports_openclip(python: Path) -> bool:
    probe = "import open_clip, transformers; from open_clip.loss import ClipLoss, SigLipLoss"
    return subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0


def openclip_python(env_dir: str | Path | None = None, *, create: bool = True,
                    quiet: bool = False) -> Path | None:
    """The interpreter of an environment where ``import open_clip`` works, or None.

    Reuses ``env_dir`` (default :func:`default_env_dir`) when it is ready; otherwise, if
    ``create``, builds it (venv + pip install). On any failure prints one line saying why to
    stderr (unless ``quiet``) and returns None, so a benchmark can skip its OpenCLIP column.
    """
    env_dir = Path(env_dir) if env_dir else default_env_dir()
    python = _env_python(env_dir)

    def skip(reason: str) -> None:
        if not quiet:
            print(f"openclip_env: {reason}; skipping OpenCLIP", file=sys.stderr)

    if (env_dir / STAMP).exists() and python.exists():
        return python
    if not create:
        skip(f"no ready environment at {env_dir}")
        return None
    try:
        if not python.exists():
            print(f"openclip_env: creating {env_dir} (one time, several GB)", file=sys.stderr)
            env_dir.parent.mkdir(parents=True, exist_ok=True)
            venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
        # Installs are resumable: pip skips what is already there.
        pins = TORCH_PAIRS.get(platform.machine(), [])
        result = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                                 "-q", *pins, PACKAGE, *EXTRAS])
        if result.returncode != 0:
            skip(f"`pip install {PACKAGE}` failed (exit {result.returncode}) in {env_dir}")
            return None
    except OSError as e:
        skip(f"cannot create {env_dir}: {e}")
        return None
    if not _imports_openclip(python):
        skip(f"`import open_clip` fails in {env_dir}")
        return None
    (env_dir / STAMP).write_text(PACKAGE + "\n")
    return python


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cli_args import make_parser

    parser = make_parser("Build (or find) the OpenCLIP environment (one time, several GB) and "
                         "print its python.")
    parser.add_argument("--dir", default=None,
                        help=f"where the environment lives (default: {default_env_dir()})")
    args = parser.parse_args()
    python = openclip_python(args.dir)
    if python is None:
        sys.exit(1)
    print(python)


if __name__ == "__main__":
    main()
