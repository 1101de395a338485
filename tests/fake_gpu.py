"""A fake CUDA device for catching device-placement bugs on a CPU-only machine.

``with fake_cuda():`` (or the ``fake_cuda_device`` fixture) makes ``torch.cuda`` report one
GPU and lets tensors live "on" it. A fake-GPU tensor is a real CPU tensor whose *storage* is
marked; a `torch.overrides.TorchFunctionMode` reads the mark and makes it look like a CUDA
tensor to Python code:

- ``.device`` is ``cuda:0``, ``.is_cuda`` True, ``.is_cpu`` False, ``.get_device()`` 0;
- ``.to("cuda")`` / ``.cuda()`` / ``Module.to("cuda")`` and factories given a CUDA ``device``
  make marked copies; ``.cpu()`` / ``.to("cpu")`` make unmarked copies;
- an op whose inputs include a marked tensor gives marked outputs (views share the storage,
  so they are marked for free); gradients read through ``.grad`` or ``torch.autograd.grad``
  take the device of their tensor;
- mixing raises as CUDA does: a fake-GPU tensor and a CPU tensor of dim > 0 in one op
  (0-dim CPU tensors are allowed, so are CPU indices into a GPU tensor and cross-device
  ``copy_``), ``.numpy()`` / ``np.asarray`` of a GPU tensor, a device index other than 0.

Numerics are exactly the CPU's: every op runs on the CPU kernels (`torch.optim` picks its
``foreach`` implementation for CUDA tensors, as it does on a real GPU; its results can differ
from the per-tensor CPU path in the last bits).

Not simulated (real CUDA behaviour these tests will not catch):

- asynchrony, streams, events, CUDA graphs, memory limits (the memory queries report 0),
  ``torch.cuda.Stream`` / ``Event``, ``torch.Generator(device="cuda")``, ``GradScaler``;
- a separate CUDA random generator: random ops on the fake GPU draw from the CPU generator
  (so results equal a plain CPU run); ``torch.cuda.get_rng_state`` / ``set_rng_state`` /
  ``manual_seed`` keep an opaque state of their own that only round-trips;
- CUDA autocast: ``torch.autocast("cuda", ...)`` is accepted and sets the CUDA autocast flags,
  but the CPU kernels ignore them, so ops stay in their input dtypes;
- checks below Python: C++ code (the autograd engine, backward hooks, DataLoader pinning,
  ``torch.accelerator``, ``UntypedStorage.device``, ``torch.save``'s location tags) sees CPU
  tensors. ``torch.save`` of a GPU tensor writes a CPU one; ``torch.load`` gives GPU tensors
  only with ``map_location`` set to a CUDA device;
- other threads and processes (the mode is thread-local); more than one GPU; dtypes CUDA
  lacks; kernels that only exist on CPU or only on CUDA;
- which device mixes real CUDA tolerates beyond the ones listed above (in-place ops on a
  CPU tensor with GPU operands raise; ``Tensor.__setitem__`` only checks its index).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import torch
from torch.overrides import TorchFunctionMode

CUDA = torch.device("cuda", 0)
_MARK = "_fake_cuda_owner"  # attribute on a marked tensor's UntypedStorage
_MIXED = ("Expected all tensors to be on the same device, but found at least two devices, "
          "cuda:0 and cpu!")
_NUMPY = ("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
          "tensor to host memory first.")
_active: FakeCudaMode | None = None


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, ...: never on the fake GPU
        return None


def _tensors(obj: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in ``obj``, looking into lists, tuples and dict values."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _tensors(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensors(item, out)
    return out


def _cuda_device(device: Any) -> torch.device | None:
    """``device`` as a `torch.device` when it names CUDA (an int is a CUDA index), else None;
    an index other than 0 raises as on a one-GPU machine."""
    if device is None or isinstance(device, torch.dtype):
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        device = torch.device("cuda", device)
    elif isinstance(device, str):
        device = torch.device(device)
    if not isinstance(device, torch.device) or device.type != "cuda":
        return None
    if device.index not in (None, 0):
        raise RuntimeError("CUDA error: invalid device ordinal")
    return CUDA


def _mixed() -> RuntimeError:
    return RuntimeError(_MIXED)


class FakeCudaMode(TorchFunctionMode):
    """The torch-function mode behind `fake_cuda`: tracks marks and checks devices."""

    def __init__(self) -> None:
        super().__init__()
        self.owner = object()  # marks from another `fake_cuda` block do not count
        T = torch.Tensor
        self._special: dict[Callable, Callable] = {
            T.device.__get__: self._device,
            T.is_cuda.__get__: lambda func, args, kwargs: self.on_gpu(args[0]) or func(*args),
            T.is_cpu.__get__: lambda func, args, kwargs: not self.on_gpu(args[0]) and func(*args),
            T.get_device: lambda func, args, kwargs: 0 if self.on_gpu(args[0]) else func(*args),
            T.grad.__get__: self._grad,
            T.to: self._to,
            T.cuda: self._cuda,
            T.cpu: self._cpu,
            T.numpy: self._numpy,
            T.__array__: self._numpy,
            T.pin_memory: self._pin_memory,
            T.type: self._type,
            T.copy_: self._unchecked,  # copies across devices are allowed
            T.data.__set__: self._unchecked,  # so is `param.data = other` (Module.to does it)
            torch._has_compatible_shallow_copy_type: self._unchecked,
            T.__getitem__: self._index,
            T.__setitem__: self._index,
            T.backward: self._unchecked,
            torch.autograd.backward: self._unchecked,
            torch.autograd.grad: self._autograd_grad,
            torch.as_tensor: self._as_tensor,
            torch.asarray: self._as_tensor,
        }

    # -- marks --------------------------------------------------------------------------------
    def on_gpu(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is on the fake GPU of this block."""
        storage = _storage(t)
        return storage is not None and getattr(storage, _MARK, None) is self.owner

    def mark(self, t: torch.Tensor) -> torch.Tensor:
        storage = _storage(t)
        if storage is not None:
            setattr(storage, _MARK, self.owner)
        return t

    def _mark_outputs(self, out: Any, unmarked_inputs: list[torch.Tensor]) -> None:
        # an output sharing memory with a CPU input (an in-place op on it, a view of it) stays
        # where it is: marking its storage would move the CPU input too
        cpu_storages = {id(_storage(t)) for t in unmarked_inputs}
        for t in _tensors(out, []):
            storage = _storage(t)
            if storage is not None and id(storage) not in cpu_storages:
                setattr(storage, _MARK, self.owner)

    # -- dispatch -----------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        special = self._special.get(func)
        if special is not None:
            return special(func, args, kwargs)
        return self._generic(func, args, kwargs)

    def _generic(self, func, args, kwargs):
        """Run ``func`` on the CPU; raise on mixed devices; mark outputs of GPU inputs."""
        target = None
        if kwargs.get("pin_memory"):  # pinned memory is ordinary memory here
            kwargs = {**kwargs, "pin_memory": False}
        if "device" in kwargs:  # factories, *_like, new_*: the device they name wins
            target = _cuda_device(kwargs["device"])
            if target is not None:
                kwargs = {**kwargs, "device": "cpu"}
            elif kwargs["device"] is not None:
                target = torch.device(kwargs["device"])
        inputs = _tensors(args, _tensors(kwargs, []))
        gpu, cpu = self._split(inputs)
        if gpu and any(t.dim() > 0 for t in cpu):
            raise _mixed()
        if gpu and cpu and _is_inplace(func) and args and args[0] is cpu[0]:
            raise _mixed()  # an in-place op cannot move its CPU self to the GPU
        out = func(*args, **kwargs)
        if (target is not None and target.type == "cuda") or (target is None and gpu):
            self._mark_outputs(out, cpu)
        return out

    def _split(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        gpu, cpu = [], []
        for t in tensors:
            (gpu if self.on_gpu(t) else cpu).append(t)
        return gpu, cpu

    # -- special cases ------------------------------------------------------------------------
    def _device(self, func, args, kwargs):
        return CUDA if self.on_gpu(args[0]) else func(*args)

    def _grad(self, func, args, kwargs):
        grad = func(*args)  # the autograd engine makes it in C++, unmarked
        if grad is not None and self.on_gpu(args[0]):
            self.mark(grad)
        return grad

    def _move(self, t: torch.Tensor, to_gpu: bool, dtype: torch.dtype | None,
              non_blocking: bool, copy: bool, memory_format: torch.memory_format | None):
        """``t`` converted to ``dtype`` on the fake GPU or the CPU; a copy when it moves."""
        moving = to_gpu != self.on_gpu(t)
        extra = {} if memory_format is None else {"memory_format": memory_format}
        out = torch.Tensor.to(t, None, dtype, non_blocking, copy or moving, **extra)
        if to_gpu:
            self.mark(out)
        return out

    def _to(self, func, args, kwargs):
        self_, rest = args[0], args[1:]
        other = rest[0] if rest and isinstance(rest[0], torch.Tensor) else kwargs.get("other")
        if isinstance(other, torch.Tensor):  # .to(other): its device and dtype
            to_gpu = self.on_gpu(other)
            non_blocking = bool(rest[1] if len(rest) > 1 else kwargs.get("non_blocking", False))
            copy = bool(rest[2] if len(rest) > 2 else kwargs.get("copy", False))
            return self._move(self_, to_gpu, other.dtype, non_blocking, copy, None)
        kwargs = dict(kwargs)
        copy = bool(kwargs.pop("copy", False))  # `_parse_to` takes no copy
        if len(rest) >= 4:  # to(device, dtype, non_blocking, copy)
            copy, rest = bool(rest[3]), rest[:3]
        elif len(rest) >= 3 and isinstance(rest[0], torch.dtype):  # to(dtype, nb, copy)
            copy, rest = bool(rest[2]), rest[:2]
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*rest, **kwargs)
        if device is None:
            to_gpu = self.on_gpu(self_)
        elif _cuda_device(device) is not None:
            to_gpu = True
        elif device.type == "cpu":
            to_gpu = False
        else:  # meta and friends: not ours
            return func(*args, **kwargs)
        return self._move(self_, to_gpu, dtype, non_blocking, copy, memory_format)

    def _cuda(self, func, args, kwargs):
        device = args[1] if len(args) > 1 else kwargs.get("device")
        if device is not None and _cuda_device(device) is None:
            raise RuntimeError("Invalid device, must be cuda device")
        non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        return self._move(args[0], True, None, non_blocking, False, kwargs.get("memory_format"))

    def _cpu(self, func, args, kwargs):
        return self._move(args[0], False, None, False, False, kwargs.get("memory_format"))

    def _numpy(self, func, args, kwargs):
        if self.on_gpu(args[0]):
            if func is torch.Tensor.numpy and kwargs.get("force"):
                return func(*args, **kwargs)  # force=True copies to the host
            raise TypeError(_NUMPY)
        return func(*args, **kwargs)

    def _pin_memory(self, func, args, kwargs):
        if self.on_gpu(args[0]):
            raise RuntimeError("cannot pin 'torch.cuda.FloatTensor' only dense CPU tensors "
                               "can be pinned")
        return args[0].clone()  # pinned memory is ordinary CPU memory here

    def _type(self, func, args, kwargs):
        out = func(*args, **kwargs)
        if len(args) == 1 and not kwargs and self.on_gpu(args[0]):
            return out.replace("torch.", "torch.cuda.", 1)
        return out

    def _unchecked(self, func, args, kwargs):
        return func(*args, **kwargs)

    def _index(self, func, args, kwargs):
        """CUDA takes CPU indices into a GPU tensor, not GPU indices into a CPU tensor."""
        self_, key = args[0], args[1]
        gpu_self = self.on_gpu(self_)
        if not gpu_self and any(self.on_gpu(t) for t in _tensors(key, [])):
            raise RuntimeError("indices should be either on cpu or on the same device as the "
                               "indexed tensor (cpu)")
        out = func(*args, **kwargs)
        if gpu_self and isinstance(out, torch.Tensor):
            self.mark(out)  # advanced indexing makes new memory
        return out

    def _autograd_grad(self, func, args, kwargs):
        grads = func(*args, **kwargs)
        inputs = args[1] if len(args) > 1 else kwargs["inputs"]
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        for grad, inp in zip(grads, inputs):
            if grad is not None and self.on_gpu(inp):
                self.mark(grad)
        return grads

    def _as_tensor(self, func, args, kwargs):
        if _cuda_device(kwargs.get("device")) is None:
            return self._generic(func, args, kwargs)
        kwargs = {**kwargs, "device": "cpu"}
        out = func(*args, **kwargs)
        source = args[0] if args else kwargs.get("obj", kwargs.get("data"))
        if not (isinstance(source, torch.Tensor) and self.on_gpu(source)):
            out = out.clone()  # it may share memory with its CPU source or a numpy array
        return self.mark(out)


def _is_inplace(func: Callable) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.startswith("_")) or \
        (name.startswith("__i") and name.endswith("__"))


# -- torch.cuda ---------------------------------------------------------------------------------
class _FakeCudaModule:
    """Stand-ins for the ``torch.cuda`` functions a one-GPU machine answers."""

    def __init__(self) -> None:
        self.rng_state = torch.zeros(16, dtype=torch.uint8)  # opaque; only round-trips
        self.seed_value = 0

    def is_bf16_supported(self, *args: Any, **kwargs: Any) -> bool:
        # `torch.autocast("cuda", dtype=torch.bfloat16)` asks too and would raise on False:
        # let autocast proceed (it is a no-op on the CPU kernels), tell everyone else False
        caller = sys._getframe(1).f_code
        return caller is torch.amp.autocast_mode.autocast.__init__.__code__

    def set_device(self, device: Any) -> None:
        _cuda_device(device)

    def get_rng_state(self, device: Any = "cuda") -> torch.Tensor:
        _cuda_device(device)
        return self.rng_state.clone()

    def set_rng_state(self, new_state: torch.Tensor, device: Any = "cuda") -> None:
        _cuda_device(device)
        if not isinstance(new_state, torch.Tensor) or new_state.dtype != torch.uint8:
            raise TypeError("expected a torch.ByteTensor as the CUDA RNG state")
        self.rng_state = new_state.detach().cpu().clone()

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [self.get_rng_state()]

    def set_rng_state_all(self, new_states: list[torch.Tensor]) -> None:
        for state in new_states:
            self.set_rng_state(state)

    def manual_seed(self, seed: int) -> None:
        self.seed_value = int(seed)
        self.rng_state = torch.tensor(list(self.seed_value.to_bytes(8, "little", signed=True))
                                      + [0] * 8, dtype=torch.uint8)

    def seed(self) -> None:
        self.manual_seed(torch.randint(0, 2 ** 62, ()).item())

    def patches(self) -> dict[str, Any]:
        zero = lambda *args, **kwargs: 0  # noqa: E731
        none = lambda *args, **kwargs: None  # noqa: E731
        return {
            "is_available": lambda: True,
            "device_count": lambda: 1,
            "is_initialized": lambda: True,
            "current_device": lambda: 0,
            "is_bf16_supported": self.is_bf16_supported,
            "set_device": self.set_device,
            "synchronize": none,
            "empty_cache": none,
            "ipc_collect": none,
            "get_rng_state": self.get_rng_state,
            "set_rng_state": self.set_rng_state,
            "get_rng_state_all": self.get_rng_state_all,
            "set_rng_state_all": self.set_rng_state_all,
            "manual_seed": self.manual_seed,
            "manual_seed_all": self.manual_seed,
            "seed": self.seed,
            "seed_all": self.seed,
            "initial_seed": lambda: self.seed_value,
            "memory_allocated": zero,
            "max_memory_allocated": zero,
            "memory_reserved": zero,
            "max_memory_reserved": zero,
            "reset_peak_memory_stats": none,
            "reset_max_memory_allocated": none,
            "mem_get_info": lambda *args, **kwargs: (16 << 30, 16 << 30),
            "get_device_name": lambda *args, **kwargs: "Fake CUDA (tests/fake_gpu.py)",
            "get_device_capability": lambda *args, **kwargs: (7, 0),  # pre-Ampere: no bf16 units
            "is_current_stream_capturing": lambda: False,
            "device": _FakeDeviceContext,
        }


class _FakeDeviceContext:
    """``torch.cuda.device(i)``: checks the index, changes nothing."""

    def __init__(self, device: Any) -> None:
        if device is not None and not (isinstance(device, int) and device < 0):
            _cuda_device(device)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def _fake_load(original: Callable, mode: FakeCudaMode) -> Callable:
    def load(f, map_location=None, *args, **kwargs):
        if isinstance(map_location, (str, torch.device, int)) and \
                _cuda_device(map_location) is not None:
            out = original(f, "cpu", *args, **kwargs)
            tensors = _tensors(out, [])
            if isinstance(out, torch.nn.Module):
                tensors += list(out.parameters()) + list(out.buffers())
            for t in tensors:
                mode.mark(t)
            return out
        return original(f, map_location, *args, **kwargs)
    return load


# -- entry points -------------------------------------------------------------------------------
@contextlib.contextmanager
def fake_cuda() -> Iterator[torch.device]:
    """Inside the block ``torch.cuda`` reports one GPU and tensors can be moved onto it (see
    the module docstring); yields ``torch.device("cuda", 0)``. Nested blocks share the outer
    one's GPU. Everything is restored on exit, also after an exception."""
    global _active
    if _active is not None:
        yield CUDA
        return
    mode = FakeCudaMode()
    cuda = _FakeCudaModule()
    with contextlib.ExitStack() as stack:
        for name, value in cuda.patches().items():
            stack.enter_context(mock.patch.object(torch.cuda, name, value))
        load = _fake_load(torch.load, mode)
        stack.enter_context(mock.patch.object(torch, "load", load))
        stack.enter_context(mock.patch.object(torch.serialization, "load", load))
        stack.enter_context(mode)
        _active = mode
        stack.callback(lambda: globals().__setitem__("_active", None))
        yield CUDA


def on_fake_gpu(t: torch.Tensor) -> bool:
    """Whether ``t`` is on the fake GPU of the active `fake_cuda` block."""
    return _active is not None and _active.on_gpu(t)


@pytest.fixture
def fake_cuda_device() -> Iterator[torch.device]:
    """The fake GPU (``cuda:0``) for the length of a test."""
    with fake_cuda() as device:
        yield device
