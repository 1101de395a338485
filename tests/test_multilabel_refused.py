"""Multi-label images (`shapes` with ``multilabel: true``, a ``multilabel-manifest``) carry no
one caption or label per image: every command but the ``multilabel_zeroshot`` task refuses
them in one line naming the key, before any output is written (each was an AttributeError
traceback from deep inside the loaders)."""

from pathlib import Path

import pytest

from cliplab.cli import main

REPO = Path(__file__).parents[1]
MULTI = "{source: shapes, multilabel: true, n: 8, seed: 7, image_size: 32}"
NOT_MULTI = "needs image-text pairs or labelled images, not multi-label images (those are " \
    "for the multilabel_zeroshot eval task)"


def _eval_suite(tmp_path: Path, name: str, task: str) -> list[str]:
    suite = tmp_path / f"{name}.yaml"
    suite.write_text(f"tasks: [{task}]\n", encoding="utf-8")
    return ["eval", "--config", str(suite), "--model", "tiny-clip", "--out",
            str(tmp_path / "ev")]


@pytest.mark.parametrize("case, where", [
    ("index", "data"), ("shard", "data"), ("pretrain", "data.train"),
    ("retrieval", "tasks[0] (name 'r'): data"),
    ("long_tail", "tasks[0] (name 'lt'): train_data"),
])
def test_a_multilabel_source_is_refused_in_one_line(case, where, tmp_path, capsys):
    out = tmp_path / "out"
    args = {
        "index": ["index", "--model", "tiny-clip", "--data", "shapes", "data.n=8",
                  "data.multilabel=true", "--out", str(out)],
        "shard": ["data", "shard", "--data", "shapes", "data.n=8", "data.multilabel=true",
                  "--out", str(out)],
        "pretrain": ["pretrain", "--config", str(REPO / "configs/pretrain/tiny-shapes.yaml"),
                     "data.train.n=16", "data.train.multilabel=true", "data.train.kinds=null",
                     "train.epochs=1", "eval=null", "--out", str(out)],
        "retrieval": _eval_suite(tmp_path, "r", f"{{name: r, task: retrieval, data: {MULTI}}}"),
        "long_tail": _eval_suite(tmp_path, "lt", "{name: lt, task: long_tail, data: {source: "
                                 f"shapes, attribute: color, n: 16, image_size: 32}}, "
                                 f"train_data: {MULTI}}}"),
    }[case]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cliplab: error: ") and err[-1].endswith(f"{where} {NOT_MULTI}")
    assert not out.exists()


def test_curate_refuses_a_multilabel_pool(tmp_path, capsys):
    out = tmp_path / "cur"
    assert main(["curate", "--config", str(REPO / "configs/curate/filters.yaml"), "--data",
                 "shapes", "data.n=20", "data.multilabel=true", "--out", str(out),
                 "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"cliplab: error: data {NOT_MULTI}"
    assert not out.exists()
