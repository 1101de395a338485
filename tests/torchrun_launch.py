"""Launch a two-rank ``torchrun`` from a test, its elastic agent's logs in the test's folder.

Without ``--log-dir`` the agent makes a ``torchelastic_*`` folder in the system's temporary
directory per launch and never removes it; under ``log_dir`` pytest's retention removes them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def torchrun_env() -> dict[str, str]:
    """The ranks' environment: offline hub, one thread each (a rank's thread count is then its
    own code's) and no tokenizer thread pool."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def torchrun(*args: str, log_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc-per-node 2 ARGS`` and return the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--log-dir", str(log_dir), *args]
    return subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True,
                          timeout=timeout)
