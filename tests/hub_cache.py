"""A Hugging Face Hub cache laid out on disk, for tests of Hub ids offline."""

from __future__ import annotations

import shutil


def hub_cache(root, repo_id: str, model_folder, sha: str = "0" * 40):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model_folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return repo / "snapshots" / sha
