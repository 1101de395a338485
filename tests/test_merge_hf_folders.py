"""`cliplab merge` on plain Hugging Face folders (no cliplab.json): as a base for cliplab
fine-tunes, mixed with them, refused when their resolved preprocessing differs, and saved in
the inputs' dtype."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPImageProcessor, CLIPModel

from cliplab.cli import main
from cliplab.errors import ModelError
from cliplab.evaluate.suite import run_task
from cliplab.models.loading import quiet_transformers
from cliplab.evaluate.tasks import TaskContext
from cliplab.merge.run import run_merge
from cliplab.models import DualEncoder
from cliplab.models.folder import weights_fingerprint, write_origin
from cliplab.models.tokenizer import byte_level_tokenizer
from tests.hub_cache import hub_cache
from tests.tiny_models import tiny_clip_config

KEY = "vision_model.encoder.layers.0.mlp.fc1.weight"


def plain_clip(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
               mean: float | None = None, resample: int = 3) -> Path:
    """A tiny CLIP written by plain transformers only: weights, tokenizer and an image
    processor (``mean``: its normalisation, CLIP's when None; ``resample``: PIL's code)."""
    torch.manual_seed(seed)
    cfg = tiny_clip_config()
    with quiet_transformers():  # its shard bar is no line of the command under test
        CLIPModel(cfg).to(dtype).save_pretrained(folder)
    byte_level_tokenizer(32).save_pretrained(folder)
    extra = {} if mean is None else {"image_mean": [mean] * 3, "image_std": [mean] * 3}
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                       resample=resample, **extra).save_pretrained(folder)
    return folder


def cliplab_fine_tune(base: Path, out: Path, seed: int) -> Path:
    """What `cliplab adapt` writes from ``base``: moved weights, cliplab.json, origin."""
    model = DualEncoder.load(base)
    fingerprint = weights_fingerprint(model.model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save(out)
    write_origin(out, base, fingerprint)
    return out


@pytest.fixture(scope="module")
def hf_family(tmp_path_factory):
    """A plain HF base and two cliplab fine-tunes of it."""
    root = tmp_path_factory.mktemp("hf-family")
    base = plain_clip(root / "base")
    assert not (base / "cliplab.json").exists()
    return base, [cliplab_fine_tune(base, root / f"ft{s}", s) for s in (1, 2)]


@pytest.mark.parametrize("method", ["task-arithmetic", "model-stock", "ties"])
def test_a_plain_hf_base_merges_with_its_cliplab_fine_tunes(hf_family, tmp_path, method):
    base, fts = hf_family
    out = tmp_path / method
    rec = run_merge({"method": method, "models": [str(f) for f in fts], "base": str(base),
                     "out": str(out)}, progress=False)
    assert rec["origin"]["unrecorded"] == []
    assert DualEncoder.load(out).preprocess_config == DualEncoder.load(base).preprocess_config


def test_a_plain_hf_folder_soups_with_a_cliplab_fine_tune(hf_family, tmp_path):
    base, fts = hf_family
    assert main(["merge", "--method", "uniform", "--models", str(base), str(fts[0]),
                 "--out", str(tmp_path / "u"), "--no-progress"]) == 0
    a, b = (DualEncoder.load(p).model.state_dict() for p in (base, fts[0]))
    merged = DualEncoder.load(tmp_path / "u").model.state_dict()
    torch.testing.assert_close(merged[KEY], (a[KEY] + b[KEY]) / 2, rtol=0, atol=1e-6)


def test_plain_hf_folders_with_other_normalisation_are_refused(tmp_path, capsys):
    """Two folders without cliplab.json are still compared as cliplab reads them."""
    a = plain_clip(tmp_path / "a")
    b = plain_clip(tmp_path / "b", mean=0.5)
    with pytest.raises(ModelError, match=rf"^{tmp_path}/b/preprocessor_config.json: "
                       rf"'preprocess.mean' differs from {tmp_path}/a/preprocessor_config"
                       r".json's \(\[0.5, 0.5, 0.5\] vs \[0.481"):
        run_merge({"method": "uniform", "models": [str(a), str(b)],
                   "out": str(tmp_path / "o")}, progress=False)
    c = plain_clip(tmp_path / "c", resample=2)  # bilinear, not bicubic
    assert main(["merge", "--method", "uniform", "--models", str(a), str(c), "--out",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'preprocess.interpolation' differs" in err[0]
    assert f"{tmp_path}/a/" in err[0] and f"{tmp_path}/c/" in err[0]
    assert not (tmp_path / "o").exists()


def test_a_difference_names_the_files_it_comes_from(hf_family, tmp_path):
    """A fine-tune's cliplab.json against a plain base's preprocessor_config.json."""
    base, fts = hf_family
    other = tmp_path / "other"
    shutil.copytree(base, other)
    processor = json.loads((other / "preprocessor_config.json").read_text())
    processor["image_std"] = [0.5, 0.5, 0.5]
    (other / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(ModelError, match=rf"^{other}/preprocessor_config.json: "
                       rf"'preprocess.std' differs from {fts[0]}/cliplab.json's"):
        run_merge({"method": "task-arithmetic", "models": [str(fts[0])], "base": str(other),
                   "out": str(tmp_path / "o")}, progress=False)


def _saved_dtypes(folder: Path) -> set[torch.dtype]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def _config_dtypes(folder: Path) -> set[str]:
    config = json.loads((folder / "config.json").read_text())
    subs = [config] + [v for v in config.values() if isinstance(v, dict)]
    return {d[k] for d in subs for k in ("dtype", "torch_dtype") if k in d}


def _uniform_of_two(tmp_path: Path, dtype_a: torch.dtype, dtype_b: torch.dtype):
    """Two plain CLIPs stored in ``dtype_a`` / ``dtype_b``, merged uniformly into ``m``:
    ``(a, b, out, record)``."""
    a, b = plain_clip(tmp_path / "a", 0, dtype_a), plain_clip(tmp_path / "b", 1, dtype_b)
    out = tmp_path / "m"
    record = run_merge({"method": "uniform", "models": [str(a), str(b)], "out": str(out)},
                       progress=False)
    return a, b, out, record


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_merge_into_a_folder_of_their_dtype(tmp_path, dtype):
    name = str(dtype).removeprefix("torch.")
    a, b, out, rec = _uniform_of_two(tmp_path, dtype, dtype)
    assert rec["dtype"] == name and rec["input_dtypes"] == {str(a): name, str(b): name}
    assert json.loads((out / "merge.json").read_text())["dtype"] == name
    assert _saved_dtypes(out) == {dtype} and _config_dtypes(out) == {name}
    plain = CLIPModel.from_pretrained(out)
    assert plain.dtype == dtype
    wa, wb = (CLIPModel.from_pretrained(p).state_dict()[KEY].float() for p in (a, b))
    torch.testing.assert_close(plain.state_dict()[KEY].float(), ((wa + wb) / 2).to(dtype)
                               .float(), rtol=0, atol=0)


def test_inputs_of_different_dtypes_merge_in_float32_and_say_so(tmp_path):
    a, b, out, _ = _uniform_of_two(tmp_path, torch.float16, torch.float32)
    record = json.loads((out / "merge.json").read_text())
    assert record["dtype"] == "float32" and "differ" in record["dtype_reason"]
    assert record["input_dtypes"] == {str(a): "float16", str(b): "float32"}
    assert _saved_dtypes(out) == {torch.float32} and _config_dtypes(out) == {"float32"}


def test_greedy_scores_half_precision_weights_as_they_are_saved(tmp_path):
    """The held-out score merge.json records is the saved float16 folder's."""
    a = plain_clip(tmp_path / "a", 0, torch.float16)
    b = plain_clip(tmp_path / "b", 1, torch.float16)
    heldout = {"task": "zeroshot", "data": {"source": "digits", "split": "test"}}
    out = tmp_path / "greedy"
    rec = run_merge({"method": "greedy", "models": [str(a), str(b)], "heldout": heldout,
                     "out": str(out)}, progress=False)
    assert rec["dtype"] == "float16" and _saved_dtypes(out) == {torch.float16}
    again = run_task(DualEncoder.load(out), heldout, TaskContext(progress=False))["acc1"]
    assert again == rec["heldout"]["merged"]


def test_held_out_weights_are_rounded_as_the_saved_folder_loads_back(tmp_path):
    from cliplab.merge.run import as_saved  # new with saving in the inputs' dtype

    a, b, out, _ = _uniform_of_two(tmp_path, torch.float16, torch.float16)
    sa, sb = (DualEncoder.load(p).model.state_dict() for p in (a, b))
    mean = {k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sa[k] for k in sa}
    rounded = as_saved(mean, torch.float16)
    loaded = DualEncoder.load(out).model.state_dict()
    assert all(torch.equal(loaded[k], rounded[k]) for k in loaded)


def test_a_plain_hf_hub_id_is_a_base_for_cliplab_fine_tunes(hf_family, tmp_path,
                                                            monkeypatch):
    base, fts = hf_family
    hub_cache(tmp_path / "hub", "org/plain-clip", base)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["merge", "--method", "task-arithmetic", "--models", *map(str, fts),
                 "--base", "org/plain-clip", "--out", str(tmp_path / "ta"),
                 "--no-progress"]) == 0
