"""The fake CUDA device of `tests.fake_gpu`: what it reports, moves, refuses and restores."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from tests.fake_gpu import fake_cuda, fake_cuda_device, on_fake_gpu  # noqa: F401 (a fixture)

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
MIXED = "Expected all tensors to be on the same device, but found at least two devices, " \
        "cuda:0 and cpu!"
NUMPY = "can't convert cuda:0 device type tensor to numpy"
PATCHED = ("is_available", "device_count", "is_bf16_supported", "is_initialized",
           "current_device", "set_device", "synchronize", "empty_cache", "get_rng_state",
           "set_rng_state", "get_rng_state_all", "set_rng_state_all", "manual_seed",
           "max_memory_allocated", "reset_peak_memory_stats", "device")


def tiny_clip():
    from cliplab.models import build_model

    torch.manual_seed(0)
    return build_model("tiny-clip", image_size=16, patch_size=8, width=32, layers=1, heads=2,
                       embed_dim=16, context_length=32)


def images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(n)]


def originals() -> dict:
    return {name: getattr(torch.cuda, name) for name in PATCHED} | {"load": torch.load}


def assert_restored(before: dict) -> None:
    assert originals() == before
    assert torch.serialization.load is before["load"]
    assert not torch.cuda.is_available()
    assert not torch._C._is_torch_function_mode_enabled()


# -- torch.cuda ---------------------------------------------------------------------------------
def test_torch_cuda_reports_one_gpu_and_is_restored_after():
    before = originals()
    with fake_cuda() as device:
        assert device == CUDA
        assert torch.cuda.is_available() and torch.cuda.is_initialized()
        assert torch.cuda.device_count() == 1 and torch.cuda.current_device() == 0
        assert not torch.cuda.is_bf16_supported()
        assert not torch.cuda.is_bf16_supported(including_emulation=False)
        torch.cuda.set_device(0)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        assert torch.cuda.max_memory_allocated() == 0
        with torch.cuda.device(0):
            pass
        with pytest.raises(RuntimeError, match="invalid device ordinal"):
            torch.cuda.set_device(1)
    assert_restored(before)


def test_everything_is_restored_after_an_exception_inside():
    before = originals()
    with pytest.raises(KeyError), fake_cuda():
        gpu = torch.ones(3, device="cuda")
        raise KeyError("boom")
    assert_restored(before)
    assert gpu.device == CPU and not gpu.is_cuda  # a plain CPU tensor again
    gpu.numpy()


def test_gpu_tensors_of_one_block_are_cpu_tensors_in_the_next():
    with fake_cuda():
        gpu = torch.ones(3, device="cuda")
    with fake_cuda():
        assert gpu.device == CPU
        with pytest.raises(RuntimeError, match="same device"):
            gpu + torch.ones(3, device="cuda")


def test_rng_states_round_trip_as_cpu_byte_tensors():
    with fake_cuda():
        state = torch.cuda.get_rng_state()
        assert state.dtype == torch.uint8 and state.device == CPU
        torch.cuda.manual_seed(7)
        assert not torch.equal(torch.cuda.get_rng_state(), state)
        torch.cuda.set_rng_state(state)
        assert torch.equal(torch.cuda.get_rng_state(), state)
        torch.cuda.set_rng_state_all(torch.cuda.get_rng_state_all())
        torch.manual_seed(3)  # seeds "all CUDA devices" too


def test_precision_auto_is_fp32_and_cuda_autocast_does_not_crash():
    from cliplab.models.precision import bf16_is_native, resolve_precision

    with fake_cuda() as device, warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not bf16_is_native(device) and resolve_precision("auto", device) == "fp32"
        x = torch.randn(2, 2, device="cuda")
        for autocast in (torch.autocast("cuda", dtype=torch.bfloat16),
                         torch.autocast(device_type="cuda", dtype=torch.bfloat16)):
            with autocast:
                assert torch.is_autocast_enabled("cuda")
                assert (x @ x).device == CUDA
        assert not torch.is_autocast_enabled("cuda")


# -- moving tensors -----------------------------------------------------------------------------
MOVES = {
    'to("cuda")': lambda t, g: t.to("cuda"),
    'to("cuda:0")': lambda t, g: t.to("cuda:0"),
    "to(device)": lambda t, g: t.to(torch.device("cuda")),
    "to(device=)": lambda t, g: t.to(device=CUDA),
    "to(gpu tensor)": lambda t, g: t.to(g),
    "cuda()": lambda t, g: t.cuda(),
    "cuda(0)": lambda t, g: t.cuda(0),
    "non_blocking": lambda t, g: t.to("cuda", non_blocking=True),
    "dtype": lambda t, g: t.to("cuda", dtype=torch.float64),
    "positional copy": lambda t, g: t.to("cuda", torch.float32, False, True),
}


@pytest.mark.parametrize("move", MOVES.values(), ids=MOVES.keys())
def test_moving_onto_the_gpu_copies(move):
    with fake_cuda():
        cpu = torch.arange(6.0).reshape(2, 3)
        gpu = move(cpu, torch.zeros(1, device="cuda"))
        assert gpu.device == CUDA and gpu.is_cuda and not gpu.is_cpu and gpu.get_device() == 0
        assert cpu.device == CPU  # the source stays where it was...
        gpu.add_(1)
        assert cpu[0, 0] == 0  # ...and does not share memory with the copy
        assert gpu.cuda() is gpu and gpu.to("cuda") is gpu


def test_moving_off_the_gpu_and_reading_values():
    with fake_cuda():
        gpu = torch.arange(6.0, device="cuda").reshape(2, 3)
        for cpu in (gpu.cpu(), gpu.to("cpu"), gpu.to(torch.ones(1))):
            assert cpu.device == CPU and not cpu.is_cuda
            np.testing.assert_array_equal(cpu.numpy(), np.arange(6.0).reshape(2, 3))
        assert gpu.sum().item() == 15 and gpu.tolist() == [[0, 1, 2], [3, 4, 5]]
        assert gpu.to(torch.float16).device == CUDA  # a dtype change stays on the GPU
        assert gpu.type() == "torch.cuda.FloatTensor"


@pytest.mark.parametrize("convert", [lambda t: t.numpy(), np.asarray, np.array,
                                     lambda t: t.detach().numpy()],
                         ids=["numpy()", "np.asarray", "np.array", "detach().numpy()"])
def test_numpy_of_a_gpu_tensor_raises(convert):
    with fake_cuda():
        with pytest.raises(TypeError, match=NUMPY):
            convert(torch.ones(2, device="cuda"))


FACTORIES = {
    "zeros": lambda d: torch.zeros(2, 3, device=d),
    "ones": lambda d: torch.ones(2, device=d),
    "empty": lambda d: torch.empty(2, device=d),
    "full": lambda d: torch.full((2,), 1.5, device=d),
    "arange": lambda d: torch.arange(4, device=d),
    "tensor": lambda d: torch.tensor([1, 2], device=d),
    "as_tensor": lambda d: torch.as_tensor(np.ones(2), device=d),
    "randn": lambda d: torch.randn(2, device=d),
    "rand": lambda d: torch.rand(2, device=d),
    "randint": lambda d: torch.randint(0, 5, (3,), device=d),
    "eye": lambda d: torch.eye(2, device=d),
    "linspace": lambda d: torch.linspace(0, 1, 5, device=d),
    "zeros_like": lambda d: torch.zeros_like(torch.ones(2), device=d),
}


@pytest.mark.parametrize("make", FACTORIES.values(), ids=FACTORIES.keys())
@pytest.mark.parametrize("device", ["cuda", "cuda:0", CUDA])
def test_factories_make_gpu_tensors(make, device):
    with fake_cuda():
        assert make(device).device == CUDA
        assert make("cpu").device == CPU


def test_like_and_new_follow_their_tensor_and_as_tensor_copies():
    with fake_cuda():
        gpu, cpu = torch.ones(2, device="cuda"), torch.ones(2)
        assert torch.zeros_like(gpu).device == CUDA and torch.rand_like(gpu).device == CUDA
        assert gpu.new_zeros(3).device == CUDA and gpu.new_tensor([1]).device == CUDA
        assert torch.zeros_like(gpu, device="cpu").device == CPU
        moved = torch.as_tensor(cpu, device="cuda")
        assert moved.device == CUDA and cpu.device == CPU
        with pytest.raises(RuntimeError, match="invalid device ordinal"):
            torch.zeros(1, device="cuda:1")


# -- mixing devices -----------------------------------------------------------------------------
MIXES = {
    "add": lambda g, c: g + c,
    "matmul": lambda g, c: c @ g,
    "cat": lambda g, c: torch.cat([g, c]),
    "where": lambda g, c: torch.where(g > 0, g, c),
    "linear": lambda g, c: F.linear(c, g),
    "cross_entropy": lambda g, c: F.cross_entropy(g, torch.zeros(2, dtype=torch.long)),
    "in-place on cpu": lambda g, c: c.add_(g),
}


@pytest.mark.parametrize("mix", MIXES.values(), ids=MIXES.keys())
def test_mixing_gpu_and_cpu_tensors_raises(mix):
    with fake_cuda():
        with pytest.raises(RuntimeError, match=MIXED.replace("!", "")):
            mix(torch.ones(2, 2, device="cuda"), torch.ones(2, 2))


def test_zero_dim_cpu_tensors_and_cpu_indices_are_allowed():
    with fake_cuda():
        gpu = torch.arange(4.0, device="cuda")
        assert (gpu * torch.tensor(2.0)).device == CUDA
        assert torch.where(gpu > 1, gpu, torch.tensor(0.0)).device == CUDA
        picked = gpu[torch.tensor([0, 2])]
        assert picked.device == CUDA and picked.tolist() == [0, 2]
        gpu[torch.tensor([1])] = 7.0
        gpu.copy_(torch.zeros(4))  # copies across devices are fine
        torch.zeros(4).copy_(gpu)
        with pytest.raises(RuntimeError, match="indices should be either on cpu"):
            torch.arange(4)[torch.tensor([0], device="cuda")]
        with pytest.raises(RuntimeError, match="same device"):
            torch.ones(2) * torch.tensor(2.0, device="cuda")  # a GPU scalar is not a CPU one


FUNCTIONAL = {
    "linear": lambda d: F.linear(torch.randn(2, 4, device=d), torch.randn(3, 4, device=d)),
    "layer_norm": lambda d: F.layer_norm(torch.randn(2, 4, device=d), (4,)),
    "sdpa": lambda d: F.scaled_dot_product_attention(*[torch.randn(1, 2, 3, 4, device=d)] * 3),
    "conv2d": lambda d: F.conv2d(torch.randn(1, 1, 4, 4, device=d),
                                 torch.randn(2, 1, 3, 3, device=d)),
    "cross_entropy": lambda d: F.cross_entropy(torch.randn(2, 3, device=d),
                                               torch.tensor([0, 2], device=d)),
    "softmax": lambda d: F.softmax(torch.randn(2, 3, device=d), dim=-1),
    "normalize": lambda d: F.normalize(torch.randn(2, 3, device=d), dim=-1),
    "embedding": lambda d: F.embedding(torch.tensor([1, 0], device=d), torch.randn(3, 2, device=d)),
}


@pytest.mark.parametrize("op", FUNCTIONAL.values(), ids=FUNCTIONAL.keys())
def test_functional_ops_stay_on_the_gpu_with_cpu_numbers(op):
    with fake_cuda():
        torch.manual_seed(0)
        out = op("cuda")
        torch.manual_seed(0)
        expected = op("cpu")
        assert out.device == CUDA and expected.device == CPU
        assert torch.equal(out.cpu(), expected)


# -- modules, autograd, optimisers --------------------------------------------------------------
def test_module_to_cuda_moves_parameters_and_buffers():
    with fake_cuda():
        for move in (lambda m: m.to("cuda"), lambda m: m.cuda(), lambda m: m.to(CUDA)):
            module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
            module[2].weight.requires_grad_(False)
            assert move(module) is module
            for p in module.parameters():
                assert isinstance(p, nn.Parameter) and p.device == CUDA
            assert [p.requires_grad for p in module.parameters()] == [True] * 4 + [False, True]
            assert all(b.device == CUDA for b in module.buffers())
            assert all(v.device == CUDA for v in module.state_dict().values())
            with pytest.raises(RuntimeError, match="same device"):
                module(torch.randn(2, 3))
            assert module(torch.randn(2, 3).cuda()).device == CUDA
            assert module.cpu()[0].weight.device == CPU
        gpu = nn.Linear(2, 2).cuda()
        assert copy.deepcopy(gpu).weight.device == CUDA
        assert nn.Parameter(torch.ones(2, device="cuda")).device == CUDA


def test_gradients_are_on_the_gpu():
    with fake_cuda():
        layer = nn.Linear(3, 2).cuda()
        layer(torch.randn(4, 3, device="cuda")).sum().backward()
        assert layer.weight.grad.device == CUDA and layer.bias.grad.device == CUDA
        x = torch.randn(3, device="cuda", requires_grad=True)
        (grad,) = torch.autograd.grad((x * x).sum(), x)
        assert grad.device == CUDA
        assert nn.utils.clip_grad_norm_(layer.parameters(), 1.0).device == CUDA


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, torch.optim.SGD])
def test_optimiser_steps_on_the_gpu_equal_cpu_ones(optimizer):
    def train(device: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2)).to(device)
        opt = optimizer(model.parameters(), lr=0.1)
        for _ in range(3):
            x, y = torch.randn(5, 4).to(device), torch.randint(0, 2, (5,)).to(device)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().cpu() for p in model.parameters()]

    expected = train("cpu")
    with fake_cuda():
        got = train("cuda")
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


# -- files --------------------------------------------------------------------------------------
def test_safetensors_and_torch_save_take_gpu_tensors(tmp_path):
    with fake_cuda():
        gpu = torch.randn(3, 2, device="cuda")
        save_file({"gpu": gpu, "cpu": torch.ones(2)}, tmp_path / "w.safetensors")
        assert torch.equal(load_file(tmp_path / "w.safetensors")["gpu"], gpu.cpu())
        assert load_file(tmp_path / "w.safetensors", device="cuda")["gpu"].device == CUDA
        buffer = io.BytesIO()
        torch.save({"gpu": gpu, "layer": nn.Linear(2, 2).cuda().state_dict()}, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, map_location="cuda")
        assert loaded["gpu"].device == CUDA and loaded["layer"]["weight"].device == CUDA
        assert torch.equal(loaded["gpu"].cpu(), gpu.cpu())
        buffer.seek(0)
        assert torch.load(buffer, map_location="cpu")["gpu"].device == CPU


# -- the project's model ------------------------------------------------------------------------
def test_dual_encoder_on_the_gpu(fake_cuda_device):  # noqa: F811 (the fixture)
    from cliplab.models.embed import embed_images, embed_texts

    model = tiny_clip()
    assert model.to("cuda") is model and model.device == fake_cuda_device
    pixels = model.preprocess(images())
    assert pixels.device == CPU
    embedded = model.encode_image(pixels.to(model.device))
    assert embedded.device == CUDA and on_fake_gpu(embedded)
    with pytest.raises(RuntimeError, match="same device"):
        model.encode_image(pixels)  # forgot to move the pixels
    tokens = model.tokenize(["a cat", "two dogs"])
    with pytest.raises(RuntimeError, match="same device"):
        model.encode_text(**tokens)
    assert model.encode_text(**{k: v.to(model.device) for k, v in tokens.items()}).device == CUDA
    rows = embed_images(model, images())
    assert isinstance(rows, np.ndarray) and rows.shape == (3, 16)
    assert embed_texts(model, ["a cat", "two dogs"]).shape == (2, 16)


def test_dual_encoder_training_step_equals_the_cpu_one():
    def step(device: str) -> tuple[float, dict[str, torch.Tensor]]:
        model = tiny_clip().to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(1)
        pixels = model.preprocess(images(), train=True).to(device)
        tokens = {k: v.to(device) for k, v in model.tokenize(["a", "b c", "d e f"]).items()}
        logits = model.encode_image(pixels) @ model.encode_text(**tokens).T \
            * model.logit_scale.exp()
        labels = torch.arange(3, device=device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        opt.step()
        return loss.item(), {k: v.detach().cpu() for k, v in model.state_dict().items()}

    loss, weights = step("cpu")
    with fake_cuda():
        gpu_loss, gpu_weights = step("cuda")
    assert gpu_loss == loss
    assert weights.keys() == gpu_weights.keys()
    assert all(torch.equal(weights[k], gpu_weights[k]) for k in weights)
