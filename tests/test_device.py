"""Where models run: ``--device`` / ``device:`` of every command, resolved and refused as a user
expects, and every command's work on a (simulated, `tests/fake_gpu.py`) GPU: the model is there,
no tensor crosses devices, and the results equal the CPU's."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cliplab.cli import main
from cliplab.models.device import resolve_device
from cliplab.provenance import without_provenance
from tests.cli_output import one_line_error
from tests.fake_gpu import fake_cuda

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
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


def test_pretrain_takes_device_on_the_command_line_as_train_device(tmp_path, capsys):
    """``--device`` of pretrain is ``train.device``: recorded in config.yaml as the key is, and a
    resume may run on another device, as with the key."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": TINY, "data": {"train": SHAPES}, "eval": None,
        "train": {"steps": 1, "batch_size": 20, "save_every": 1, "augment": False}}),
        encoding="utf-8")
    run = tmp_path / "run"
    with fake_cuda():  # auto would take the GPU
        assert main(["pretrain", "--config", str(recipe), "--out", str(run), "--device", "cpu",
                     "--no-progress"]) == 0
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        assert config["train"]["device"] == "cpu"
        assert json.loads((run / "results.json").read_text(encoding="utf-8"))["device"] == "cpu"
        assert main(["pretrain", "--out", str(run), "--resume", "latest", "--device", "cuda",
                     "train.steps=2", "--no-progress"]) == 0
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    assert results["device"].startswith("cuda") and results["resumed_from"]["step"] == 1
    capsys.readouterr()
    # given twice, as --device and as the key, with two values: refused naming both
    assert main(["pretrain", "--config", str(recipe), "--device", "cpu",
                 "train.device=auto"]) == 2
    assert one_line_error(capsys) == ("the command line: train.device is given twice, as "
                                      "--device cpu and as train.device=auto; give one")


@pytest.mark.parametrize("command", ["pretrain", "quickstart"])
def test_a_wrong_train_device_on_the_command_line_is_refused_naming_device(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--device", "gpu"])
    assert stop.value.code == 2
    assert f"cliplab {command}: error: argument --device: 'gpu' is no device (cpu, cuda, " \
        "cuda:N, mps or auto)\n" in capsys.readouterr().err


def test_quickstart_takes_device_as_train_device_and_keeps_its_default(monkeypatch):
    from cliplab import quickstart
    from cliplab.errors import CliplabError

    configs = []

    def run_quickstart(cfg, progress=True):
        configs.append(cfg)
        raise CliplabError("stopped by the test")

    monkeypatch.setattr(quickstart, "run_quickstart", run_quickstart)
    assert main(["quickstart", "--device", "cpu"]) == 2
    assert main(["quickstart"]) == 2
    given, default = configs
    assert given.train.device == "cpu" and default.train.device == "auto"
    assert given.model_dump() == {**default.model_dump(),
                                  "train": {**default.train.model_dump(), "device": "cpu"}}


def test_a_config_device_is_refused_naming_its_key(capsys, tmp_path):
    config = tmp_path / "a.yaml"
    config.write_text(yaml.safe_dump({"method": "zeroshot", "device": "gpu",
                                      "data": {"train": SHAPES, "test": SHAPES}}))
    assert main(["adapt", "--config", str(config), "--model", "tiny-clip"]) == 2
    assert one_line_error(capsys) == (f"{config}: device: 'gpu' is no device (cpu, cuda, "
                                      "cuda:N, mps or auto)")


CLIP_SCORE = [{"step": "clip_score", "model": "tiny-clip", "keep_top": 0.9}]


def test_curate_maps_on_the_gpu_locally_and_on_cpus_under_ray():
    from cliplab.curate.config import CurateConfig

    with fake_cuda():
        assert resolve_device(CurateConfig(data=SHAPES).step_device()) == torch.device("cuda")
        assert CurateConfig(data=SHAPES, steps=CLIP_SCORE, device="cpu").step_device() == "cpu"
        assert CurateConfig(data=SHAPES, engine="ray").step_device() == "cpu"
        with pytest.raises(ValueError, match="device: cuda runs the steps' models with engine "
                                             "local .* engine ray maps on its actors' CPUs"):
            CurateConfig(data=SHAPES, steps=CLIP_SCORE, engine="ray", device="cuda")
    assert resolve_device(CurateConfig(data=SHAPES).step_device()) == torch.device("cpu")


@pytest.mark.parametrize("command", [
    ["curate", "--config", str(CONFIGS / "curate/basic.yaml"), "--out", "OUT/c"],
    ["merge", "--method", "uniform", "--models", "a", "b", "--out", "OUT/m"],
])
def test_a_device_no_step_uses_is_refused_by_curate_as_by_merge(command, tmp_path, capsys):
    """merge refused --device without heldout (nothing is scored), while curate took it with no
    step that runs a model: both refuse a setting that changes nothing, naming it."""
    argv = [a.replace("OUT", str(tmp_path)) for a in command]
    assert main([*argv, "--device", "cpu"]) == 2
    assert "device has no effect without" in one_line_error(capsys)
    assert not list(tmp_path.iterdir())


def test_curate_takes_a_device_when_a_step_runs_a_model():
    from cliplab.curate.config import CurateConfig

    decontaminate = {"step": "decontaminate", "eval_sets": [SHAPES], "hash_distance": 4}
    assert CurateConfig(data=SHAPES, steps=[{**decontaminate, "model": "tiny-clip"}],
                        device="cpu").device == "cpu"
    with pytest.raises(ValueError, match="device has no effect without a step that runs a "
                                         "model"):  # matched by perceptual hash only
        CurateConfig(data=SHAPES, steps=[{**decontaminate, "threshold": None}], device="cpu")
    assert CurateConfig(data=SHAPES, device="auto").device == "auto"  # the default passes


# -- each command's work on the GPU ---------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from cliplab.models import build_model

    torch.manual_seed(0)
    return build_model(TINY["name"], **TINY["options"]).save(tmp_path_factory.mktemp("m") / "model")


@contextlib.contextmanager
def image_work_on_the_fake_gpu():
    """The fake GPU, yielding the devices every image embedding was projected on (each image
    path, eval's, training's, a search's, goes through `DualEncoder.project_image`)."""
    from cliplab.models.dual_encoder import DualEncoder

    seen: set[str] = set()
    project = DualEncoder.project_image

    def spy(self, pooled):
        seen.add(str(pooled.device))
        return project(self, pooled)

    with fake_cuda(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(DualEncoder, "project_image", spy)
        yield seen


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
    return without_provenance(json.loads(capsys.readouterr().out))  # not when it ran


def test_eval_runs_every_task_on_the_gpu_with_the_cpus_results(model_dir, tmp_path, capsys):
    on_cpu = _eval(model_dir, tmp_path, "cpu", capsys)
    with image_work_on_the_fake_gpu() as devices:
        on_gpu = _eval(model_dir, tmp_path, "auto", capsys)
    assert devices == {"cuda:0"}
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
    "zeroshot": {}, "linear-probe": {"features": "tokens"}, "tip-adapter": {"search": True},
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
    kept = {k: v for k, v in without_provenance(results).items()
            if k not in ("wall_time_s", "adapter")}
    return json.loads(json.dumps(kept, default=str).replace(str(out), "OUT"))


@pytest.mark.parametrize("method", list(ADAPT_OPTIONS))
def test_adapt_fits_and_scores_on_the_gpu_with_the_cpus_results(method, model_dir, tmp_path):
    from cliplab.adapt import ADAPT_METHODS
    import cliplab.train.trainer as trainer

    # every method is run: a new one needs its fastest options here
    assert set(ADAPT_OPTIONS) == set(ADAPT_METHODS), set(ADAPT_METHODS) ^ set(ADAPT_OPTIONS)
    on_cpu = _adapt(method, model_dir, tmp_path / "cpu", "cpu")
    devices = []
    resolve = trainer.resolve_device
    with image_work_on_the_fake_gpu() as image_devices:
        with pytest.MonkeyPatch.context() as patch:  # where the Trainer-based methods train
            patch.setattr(trainer, "resolve_device",
                          lambda name: devices.append(str(name)) or resolve(name))
            on_gpu = _adapt(method, model_dir, tmp_path / "gpu", "auto")
    assert devices == (["cuda:0"] if method in ("finetune", "lora", "wise-ft") else [])
    assert image_devices == {"cuda:0"}
    if method in ("finetune", "lora", "wise-ft"):  # where each trained is recorded: it differs
        assert (on_cpu["train_settings"].pop("device"),
                on_gpu["train_settings"].pop("device")) == ("cpu", "cuda:0")
    assert _same(on_gpu, on_cpu)


def test_wise_ft_of_a_given_fine_tune_sweeps_on_the_gpu_with_the_cpus_results(model_dir, tmp_path):
    """``options.finetuned`` (a fine-tune on disk) is loaded where the zero-shot model is."""
    _adapt("finetune", model_dir, tmp_path / "ft", "cpu")
    given = {"alphas": [0, 0.5, 1], "finetuned": str(tmp_path / "ft")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ADAPT_OPTIONS, "wise-ft", given)
        on_cpu = _adapt("wise-ft", model_dir, tmp_path / "cpu", "cpu")
        with image_work_on_the_fake_gpu() as devices:
            on_gpu = _adapt("wise-ft", model_dir, tmp_path / "gpu", "auto")
    assert devices == {"cuda:0"} and _same(on_gpu, on_cpu)


def test_a_greedy_soup_scores_its_ingredients_on_the_gpu_with_the_cpus_choices(tmp_path):
    from cliplab.merge.run import run_merge
    from tests.serve_helpers import save_tiny_model

    models = [str(save_tiny_model(tmp_path / f"m{seed}", seed)) for seed in (0, 1, 2)]

    def merge(out, device: str) -> dict:
        record = run_merge({"method": "greedy", "models": models, "device": device,
                            "heldout": {"task": "zeroshot", "data": {"source": "digits",
                                                                     "split": "test"}},
                            "out": str(out)}, progress=False)
        return {k: v for k, v in _untimed(record).items() if k != "out"}

    on_cpu = merge(tmp_path / "cpu", "cpu")
    with image_work_on_the_fake_gpu() as devices:
        on_gpu = merge(tmp_path / "gpu", "auto")
    assert devices == {"cuda:0"} and _same(on_gpu, on_cpu)
    assert (tmp_path / "gpu" / "model.safetensors").read_bytes() == \
        (tmp_path / "cpu" / "model.safetensors").read_bytes()  # the same weights, merged


@pytest.fixture
def endpoints_on_the_fake_gpu(monkeypatch):
    """FastAPI runs sync endpoints on worker threads, where the (thread-local) fake GPU is not
    active: run them inline, inside it."""
    import fastapi.routing

    import tests.fake_gpu as fake_gpu

    async def inline(func, *args, **kwargs):
        with fake_gpu._active or contextlib.nullcontext():
            return func(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "run_in_threadpool", inline)


def _serve_session(index, device: str) -> list:
    """What a user's session gets back: text and image search, labels by id, by upload and for
    several ids, and an indexed image."""
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from cliplab.data.shapes import load_shapes
    from cliplab.serve.run import open_app

    app = open_app(str(index), device=device)
    png = io.BytesIO()
    Image.fromarray(load_shapes(n=3, seed=3, image_size=32).images[2].numpy()).save(png, "PNG")
    client = TestClient(app)
    upload = {"file": ("x.png", png.getvalue(), "image/png")}
    responses = [
        client.get("/api/search", params={"q": "a red circle", "k": 5}),
        client.post("/api/search/image", params={"k": 5}, files=upload),
        client.post("/api/classify", data={"labels": "red, blue, green", "id": "3"}),
        client.post("/api/classify", data={"labels": "red, blue, green"}, files=upload),
        client.post("/api/classify/ids", data={"labels": "red, blue, green", "ids": "3,1,4"}),
        client.get("/images/3")]
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    return [r.json() for r in responses[:5]] + [responses[5].content]


def test_index_and_serve_run_on_the_gpu_with_the_cpus_results(model_dir, tmp_path,
                                                              endpoints_on_the_fake_gpu):
    from cliplab.serve.index import SearchIndex
    from tests.serve_helpers import SHAPES as INDEXED, build

    build(model_dir, INDEXED, tmp_path / "cpu", device="cpu")
    on_cpu = _serve_session(tmp_path / "cpu", "cpu")
    with image_work_on_the_fake_gpu() as devices:
        build(model_dir, INDEXED, tmp_path / "gpu")  # device auto: the GPU
        on_gpu = _serve_session(tmp_path / "gpu", "auto")
    assert devices == {"cuda:0"}
    cpu_index, gpu_index = SearchIndex(tmp_path / "cpu"), SearchIndex(tmp_path / "gpu")
    ids = list(range(cpu_index.count))
    np.testing.assert_allclose(np.stack([gpu_index.vector(i) for i in ids]),
                               np.stack([cpu_index.vector(i) for i in ids]), atol=1e-6)
    assert _same(on_gpu[:5], on_cpu[:5]) and on_gpu[5] == on_cpu[5]


def _curate(model_dir, out, device: str) -> dict:
    from cliplab.config import validate
    from cliplab.curate.config import CurateConfig
    from cliplab.curate.pipeline import run_curation

    model = str(model_dir)
    steps = [
        {"step": "clip_score", "model": model, "keep_top": 0.9},
        {"step": "semantic_dedup", "model": model, "eps": 1e-3},
        {"step": "dfn", "model": TINY, "trusted": {**SHAPES, "seed": 9},
         "train": {"steps": 2, "batch_size": 8}, "keep_top": 0.8},
        {"step": "decontaminate", "model": model, "threshold": 0.999, "hash_distance": None,
         "eval_sets": [{**SHAPES, "n": 10, "seed": 4}]}]
    config = validate(CurateConfig, {"data": {**SHAPES, "n": 80}, "steps": steps, "out": str(out),
                                     "device": device, "chunk_size": 32})
    summary = without_provenance(run_curation(config, progress=False))  # when: not compared
    for step in summary["steps"]:
        step.pop("seconds")
    return json.loads(json.dumps(summary).replace(str(out), "OUT"))


def test_curate_runs_its_model_steps_on_the_gpu_with_the_cpus_results(model_dir, tmp_path,
                                                                      monkeypatch):
    import cliplab.train.trainer as trainer

    on_cpu = _curate(model_dir, tmp_path / "cpu", "cpu")
    devices = []
    resolve = trainer.resolve_device
    monkeypatch.setattr(trainer, "resolve_device",
                        lambda name: devices.append(str(name)) or resolve(name))
    with image_work_on_the_fake_gpu() as image_devices:
        on_gpu = _curate(model_dir, tmp_path / "gpu", "auto")
    assert devices == ["auto"]  # the filtering network trains where the steps run
    assert image_devices == {"cuda:0"}  # and every step's model embeds there
    assert all(s["dropped"] for s in on_cpu["steps"][1:])  # every step drops some, keeps some
    assert all(s["kept"] for s in on_cpu["steps"])
    assert _same(on_gpu, on_cpu)


PRETRAIN_VARIANTS = {
    "plain": {"eval_every": 2},
    "locked text, cached, hard negatives": {
        "lock_text": True, "cache_frozen_features": True, "hard_negatives": True},
    "siglip, tiled, micro-batched": {"loss": "siglip", "loss_tile": 8, "micro_batch_size": 8},
}


def _pretrain(out, device: str, train: dict, resume_at: int | None = None) -> tuple[dict, dict]:
    from cliplab.models.dual_encoder import DualEncoder
    from cliplab.train.pretrain import run_pretrain

    model = TINY if train.get("loss") != "siglip" else {"name": "tiny-siglip", "options": {
        k: v for k, v in TINY["options"].items() if k != "embed_dim"}}
    cfg = {"model": model, "data": {"train": {**SHAPES, "n": 64, "kinds": ["single", "relation"]}},
           "train": {"steps": 4, "batch_size": 16, "lr": 3e-3, "warmup": 1, "log_every": 1,
                     "save_every": 2, "augment": False, "device": device, **train},
           "eval": {"tasks": [{"name": "colour", "task": "zeroshot",
                               "data": {**SHAPES, "attribute": "color"}}]},
           "out": str(out)}
    results = run_pretrain(cfg, progress=False)
    if resume_at is not None:  # then resumed from its checkpoint of that step: the same run
        results = run_pretrain(cfg, resume=str(out / "checkpoints" / f"step-{resume_at}"),
                               progress=False)
    weights = DualEncoder.load(results["model_dir"]).model.state_dict()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kept = {k: v for k, v in results.items() if k not in ("model_dir", "out")}
    return _untimed({"results": kept, "metrics": logged}), weights


def _untimed(value):
    """``value`` without its timings (keys naming a time or a rate, and when it was written)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items()
                if not any(word in k for word in ("time", "per_s", "seconds", "created"))}
    return [_untimed(v) for v in value] if isinstance(value, list) else value


@pytest.mark.parametrize("variant", list(PRETRAIN_VARIANTS))
def test_pretraining_on_the_gpu_takes_the_cpus_steps(variant, tmp_path):
    train = PRETRAIN_VARIANTS[variant]
    on_cpu, cpu_weights = _pretrain(tmp_path / "cpu", "cpu", train)
    with image_work_on_the_fake_gpu() as devices:
        on_gpu, gpu_weights = _pretrain(tmp_path / "gpu", "auto", train, resume_at=2)
    # where each ran, and that the GPU run went on from its step 2, are recorded: they differ
    cpu_run, gpu_run = on_cpu["results"], on_gpu["results"]
    assert (cpu_run.pop("device"), cpu_run.pop("resumed_from")) == ("cpu", None)
    assert gpu_run.pop("device").startswith("cuda") and gpu_run.pop("resumed_from") == {
        "checkpoint": str((tmp_path / "gpu" / "checkpoints" / "step-2").resolve()), "step": 2,
        "precision": "fp32"}
    assert devices == {"cuda:0"} and _same(on_gpu, on_cpu)
    for name, weight in cpu_weights.items():
        torch.testing.assert_close(gpu_weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)


def _quickstart(out) -> dict:
    from cliplab.quickstart import run_quickstart

    results = run_quickstart({"data": {"train_limit": 400, "test_limit": 100},
                              "model": {"options": {"width": 32, "layers": 1, "heads": 2}},
                              "train": {"steps": 3, "batch_size": 32},
                              "eval": {"probe_train_size": 200}, "out": str(out)},
                             progress=False)
    results.pop("precision")  # `auto` resolves per device: the fake GPU has no bf16 units
    return json.loads(json.dumps(_untimed(results)).replace(str(out), "OUT"))


def test_the_quickstart_runs_on_the_gpu_with_the_cpus_results(tmp_path, monkeypatch):
    """The LiT model's pretrained MiniLM tower is loaded without transformers' Hub kernels,
    which a GPU's first train() fetched from the Hub (offline: an error)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    on_cpu = _quickstart(tmp_path / "cpu")
    with image_work_on_the_fake_gpu() as devices:
        on_gpu = _quickstart(tmp_path / "gpu")
    assert devices == {"cuda:0"} and _same(on_gpu, on_cpu)


@pytest.mark.parametrize("device, train_device, expected", [
    ("cpu", None, "cpu"),     # the steps' device
    ("cpu", "cuda", "cuda"),  # the step's own train.device wins
])
def test_the_filtering_network_trains_where_the_steps_run_unless_told(device, train_device,
                                                                       expected, tmp_path,
                                                                       monkeypatch):
    from cliplab.config import validate
    from cliplab.curate.config import CurateConfig
    from cliplab.curate.pipeline import run_curation
    import cliplab.train.trainer as trainer

    devices = []
    resolve = trainer.resolve_device
    monkeypatch.setattr(trainer, "resolve_device",
                        lambda name: devices.append(str(name)) or resolve(name))
    train = {"steps": 1, "batch_size": 8, **({"device": train_device} if train_device else {})}
    with fake_cuda():
        run_curation(validate(CurateConfig, {
            "data": SHAPES, "out": str(tmp_path / "out"), "device": device,
            "steps": [{"step": "dfn", "model": TINY, "trusted": {**SHAPES, "seed": 9},
                       "train": train, "keep_top": 0.8}]}), progress=False)
    assert devices == [expected]


def test_an_onnx_export_runs_on_the_cpu_under_auto_and_refuses_a_named_gpu(model_dir, tmp_path,
                                                                           capsys):
    from cliplab.models.dual_encoder import DualEncoder
    from cliplab.models.onnx_export import export_onnx

    exported = export_onnx(DualEncoder.load(model_dir), tmp_path / "onnx")
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({"tasks": EVAL_TASKS[:1]}))
    args = ["eval", "--config", str(suite), "--model", str(exported), "--no-progress"]
    on_cpu = main(args) == 0 and without_provenance(json.loads(capsys.readouterr().out))
    with fake_cuda():
        assert main(args) == 0  # auto: the export's own CPU (the same results, written later)
        assert without_provenance(json.loads(capsys.readouterr().out)) == on_cpu
        assert main([*args, "--device", "cuda"]) == 2
    assert one_line_error(capsys) == (f"{exported} is an ONNX export, which runs on the CPU "
                                      "here (onnxruntime); device cuda cannot run it: use cpu "
                                      "or auto")


def test_a_curate_run_resumes_on_another_device(tmp_path, monkeypatch):
    """``device`` changes where the steps run, not what is kept: a run stopped before its
    rename, re-run with another device, is finished, not refused as another config's."""
    from cliplab.config import validate
    from cliplab.curate import pipeline
    from cliplab.curate.config import CurateConfig

    def curate(device: str) -> dict:
        return pipeline.run_curation(validate(CurateConfig, {
            "data": SHAPES, "steps": [{"step": "clip_score", "model": TINY, "keep_top": 1.0}],
            "device": device,
            "out": str(tmp_path / "out")}), progress=False)

    def killed(work, out):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "_move_into_place", killed)
        with pytest.raises(KeyboardInterrupt):
            curate("cpu")
    assert curate("auto")["kept"] == SHAPES["n"]


class _Reached(Exception):
    """Raised by a stand-in for a command's work: what the command line set has arrived."""


@pytest.mark.parametrize("command, module, function, extra", [
    ("index", "cliplab.serve.build", "build_index", ["--model", "tiny-clip", "--data", "shapes",
                                                     "--out", "IDX"]),
    ("curate", "cliplab.curate.pipeline", "run_curation", ["--config", "CURATE", "--out", "C"]),
    ("adapt", "cliplab.adapt.run", "run_adapt", ["--method", "zeroshot", "--model", "tiny-clip",
                                                 "data.train={source: shapes}",
                                                 "data.test={source: shapes}"]),
    # merge's device is where held-out data scores (without heldout it is refused)
    ("merge", "cliplab.merge.run", "run_merge", [
        "--method", "uniform", "--models", "M", "M", "--out", "MERGED",
        "heldout={task: zeroshot, data: {source: shapes}}"]),
    ("serve", "cliplab.serve.run", "serve", ["IDX"]),
])
def test_device_on_the_command_line_reaches_each_command(command, module, function, extra,
                                                          tmp_path, monkeypatch):
    import importlib

    curate = tmp_path / "c.yaml"
    curate.write_text(yaml.safe_dump({"data": SHAPES, "steps": CLIP_SCORE}), encoding="utf-8")
    (tmp_path / "M").mkdir()
    monkeypatch.chdir(tmp_path)
    seen = []

    def reached(cfg=None, *args, **kwargs):
        seen.append(kwargs["device"] if command == "serve" else cfg.device)
        raise _Reached

    monkeypatch.setattr(importlib.import_module(module), function, reached)
    args = [a.replace("CURATE", str(curate)) for a in extra]
    with fake_cuda(), pytest.raises(_Reached):
        main([command, *args, "--device", "cuda:0"])
    assert seen == ["cuda:0"]
