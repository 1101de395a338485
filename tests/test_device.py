"""Where models run: ``--device`` / ``device:`` of every command, resolved and refused as a user
expects, and every command's work on a (simulated, `tests/fake_gpu.py`) GPU: the model is there,
no tensor crosses devices, and the results equal the CPU's."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cliplab.cli import main
from cliplab.errors import ConfigError
from cliplab.models.device import resolve_device
from tests.cli_output import one_line_error
from tests.fake_gpu import fake_cuda, on_fake_gpu

TINY = {"name": "tiny-clip", "options": {"image_size": 16, "patch_size": 8, "width": 32,
                                          "layers": 1, "heads": 2, "embed_dim": 16,
                                          "context_length": 48}}
SHAPES = {"source": "shapes", "n": 60, "seed": 1, "image_size": 32}


# -- resolving a device name ----------------------------------------------------------------------
def test_auto_is_the_cpu_without_a_gpu_and_the_gpu_with_one():
    assert resolve_device("auto") == torch.device("cpu")
    with fake_cuda():
        assert resolve_device("auto") == torch.device("cuda")
        assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_device_this_machine_lacks_is_refused_naming_what_it_has():
    with pytest.raises(ValueError, match=r"'cuda', but this PyTorch sees no CUDA device"):
        resolve_device("cuda")
    with fake_cuda(), pytest.raises(ValueError, match=r"'cuda:1', but this machine has 1 GPU\(s\) "
                                                      r"\(cuda:0 to cuda:0\)"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match=r"'gpu' is no device \(cpu, cuda, cuda:N, mps or auto\)"):
        resolve_device("gpu")


def test_device_on_the_command_line_is_checked_before_any_work(capsys, tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({"tasks": [{"name": "zs", "task": "zeroshot",
                                                "data": SHAPES}]}))
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--config", str(suite), "--model", "tiny-clip", "--device", "cuda"])
    assert stop.value.code == 2
    assert "argument --device: 'cuda', but this PyTorch sees no CUDA device; use cpu or auto" \
        in capsys.readouterr().err


def test_a_config_device_is_refused_naming_its_key(capsys, tmp_path):
    config = tmp_path / "a.yaml"
    config.write_text(yaml.safe_dump({"method": "zeroshot", "device": "gpu",
                                      "data": {"train": SHAPES, "test": SHAPES}}))
    assert main(["adapt", "--config", str(config), "--model", "tiny-clip"]) == 2
    assert one_line_error(capsys) == (f"{config}: device: 'gpu' is no device (cpu, cuda, "
                                      "cuda:N, mps or auto)")


def test_curate_maps_on_the_gpu_locally_and_on_cpus_under_ray():
    from cliplab.curate.config import CurateConfig

    with fake_cuda():
        assert CurateConfig(data=SHAPES).step_device() == "cuda"
        assert CurateConfig(data=SHAPES, device="cpu").step_device() == "cpu"
        assert CurateConfig(data=SHAPES, engine="ray").step_device() == "cpu"
        with pytest.raises(ValueError, match="device: cuda runs the steps' models with engine "
                                             "local .* engine ray maps on its actors' CPUs"):
            CurateConfig(data=SHAPES, engine="ray", device="cuda")
    assert CurateConfig(data=SHAPES).step_device() == "cpu"


# -- each command's work on the GPU ---------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from cliplab.models import build_model

    torch.manual_seed(0)
    return build_model(TINY["name"], **TINY["options"]).save(tmp_path_factory.mktemp("m") / "model")


EVAL_TASKS = [
    {"name": "zs", "task": "zeroshot", "data": {**SHAPES, "attribute": "color"}},
    {"name": "probe", "task": "linear_probe", "train": {**SHAPES, "attribute": "color", "seed": 2},
     "test": {**SHAPES, "attribute": "color"}},
    {"name": "fs", "task": "few_shot", "train": {**SHAPES, "attribute": "color", "seed": 2},
     "test": {**SHAPES, "attribute": "color"}, "shots": [1, 2], "seeds": [0, 1]},
    {"name": "ret", "task": "retrieval", "data": SHAPES},
    {"name": "comp", "task": "compositional", "data": SHAPES},
    {"name": "ml", "task": "multilabel_zeroshot",
     "data": {**SHAPES, "multilabel": True, "attribute": "color"}},
    {"name": "lt", "task": "long_tail", "data": {**SHAPES, "attribute": "color"},
     "train_data": {**SHAPES, "seed": 5}},
]


def _eval(model_dir, tmp_path, device: str, capsys) -> dict:
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"tasks": EVAL_TASKS}))
    assert main(["eval", "--config", str(suite), "--model", str(model_dir), "--device", device,
                 "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_runs_every_task_on_the_gpu_with_the_cpus_results(model_dir, tmp_path, capsys,
                                                                monkeypatch):
    import cliplab.models.resolve as resolve

    on_cpu = _eval(model_dir, tmp_path, "cpu", capsys)
    devices = []
    load = resolve.load_model
    monkeypatch.setattr(resolve, "load_model",
                        lambda spec, device="cpu": devices.append(device) or load(spec, device))
    with fake_cuda():
        on_gpu = _eval(model_dir, tmp_path, "auto", capsys)
    assert devices == [torch.device("cuda")]
    assert list(on_gpu["results"]) == [t["name"] for t in EVAL_TASKS]
    assert _same(on_gpu, on_cpu)


def _same(a, b, path="") -> bool:
    """``a`` equals ``b``, floats to 1e-5 (assert with the path of the first difference)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        return all(_same(a[k], b[k], f"{path}.{k}") for k in a)
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        return all(_same(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6, nan_ok=True), path
        return True
    assert a == b, path
    return True


ADAPT_OPTIONS = {
    "zeroshot": {}, "linear-probe": {"features": "layers"}, "tip-adapter": {"search": True},
    "tip-adapter-f": {"epochs": 2, "augment_views": 2}, "clip-adapter": {"epochs": 2},
    "coop": {"epochs": 2}, "cocoop": {"epochs": 1, "batch_size": 4},
    "finetune": {"train": {"steps": 2, "batch_size": 4}},
    "lora": {"train": {"steps": 2, "batch_size": 4}},
    "wise-ft": {"alphas": [0, 0.5, 1], "train": {"steps": 2, "batch_size": 4}},
}
DIGITS_ADAPT = {"train": {"source": "digits", "split": "train"},
                "test": {"source": "digits", "split": "test"},
                "shifted": {"source": "digits", "split": "test", "shift": "invert"}}


def _adapt(method: str, model_dir, out, device: str) -> dict:
    from cliplab.adapt.run import run_adapt

    torch.manual_seed(0)
    results = run_adapt({"method": method, "model": str(model_dir), "data": DIGITS_ADAPT,
                         "shots": 2, "val_shots": 1, "seed": 0, "device": device,
                         "options": ADAPT_OPTIONS[method], "out": str(out)}, progress=False)
    kept = {k: v for k, v in results.items() if k not in ("wall_time_s", "adapter")}
    return json.loads(json.dumps(kept, default=str).replace(str(out), "OUT"))


@pytest.mark.parametrize("method", list(ADAPT_OPTIONS))
def test_adapt_fits_and_scores_on_the_gpu_with_the_cpus_results(method, model_dir, tmp_path):
    from cliplab.adapt import ADAPT_METHODS
    import cliplab.train.trainer as trainer

    assert set(ADAPT_OPTIONS) == set(ADAPT_METHODS)  # every method is run
    on_cpu = _adapt(method, model_dir, tmp_path / "cpu", "cpu")
    devices = []
    resolve = trainer.resolve_device
    with fake_cuda():
        with pytest.MonkeyPatch.context() as patch:  # where the Trainer-based methods train
            patch.setattr(trainer, "resolve_device",
                          lambda name: devices.append(str(name)) or resolve(name))
            on_gpu = _adapt(method, model_dir, tmp_path / "gpu", "auto")
    assert devices == (["cuda:0"] if method in ("finetune", "lora", "wise-ft") else [])
    assert _same(on_gpu, on_cpu)
