"""Two ranks on CPU with gloo: the global-batch losses equal one process on the same batch, and a
rank that dies or hangs ends the other with a DistributedError instead of a hang."""

from __future__ import annotations

import os
import re
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from cliplab.errors import ConfigError
from cliplab.train.contrastive import contrastive_loss
from tests.ports import free_port

SIZES = [5, 7]  # unequal local batches: the gather pads and the shares are weighted
KEYS = {None: None,
        "one": torch.tensor([0, 1, 2, 0, 3, 1, 2, 4, 0, 5, 3, 6]),  # positives across ranks too
        # a drawn caption, then the captions describing the image: positives not symmetric
        "sets": torch.tensor([[0, 0, 1], [1, 1, -1], [2, 2, 0], [0, 0, 3], [3, 3, -1],
                              [4, 4, 1], [1, 1, 4], [5, 5, -1], [0, 0, 2], [6, 6, 5],
                              [3, 3, 6], [2, 2, -1]])}
CASES = [(kind, keys, tile) for kind in ("clip", "siglip") for keys in KEYS
         for tile in (None, 4)]


class Towers(torch.nn.Module):
    """Two linear 'towers' plus the temperature (and bias): enough to check every gradient."""

    def __init__(self, bias: bool):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(6, 5)
        self.text = torch.nn.Linear(4, 5)
        self.logit_scale = torch.nn.Parameter(torch.tensor(1.3))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-2.0)) if bias else None

    def forward(self, x_image, x_text):
        return F.normalize(self.image(x_image), dim=-1), F.normalize(self.text(x_text), dim=-1)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(sum(SIZES), 6, generator=g), torch.randn(sum(SIZES), 4, generator=g)


def _step(model, forward, x_image, x_text, keys, kind, tile, gather):
    img, txt = forward(x_image, x_text)
    loss = contrastive_loss(img, txt, model.logit_scale, model.logit_bias, kind=kind, keys=keys,
                            tile=tile, gather=gather)
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def single_process_reference(kind: str, with_keys: str | None) -> tuple[float, dict]:
    model = Towers(bias=kind == "siglip")
    x_image, x_text = _batch()
    loss, grads = _step(model, model, x_image, x_text, KEYS[with_keys], kind, None,
                        gather=False)
    return loss.item(), grads


# --- what each spawned rank runs ---------------------------------------------------------------

def _equivalence(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from cliplab.train.distributed import all_gather_with_grad, mean_over_ranks

    out = {}
    start = sum(SIZES[:rank])
    rows = slice(start, start + SIZES[rank])
    x_image, x_text = _batch()
    for kind, with_keys, tile in CASES:
        model = Towers(bias=kind == "siglip")
        ddp = DistributedDataParallel(model)  # averages the towers' gradients over ranks
        loss, grads = _step(model, ddp, x_image[rows], x_text[rows],
                            None if with_keys is None else KEYS[with_keys][rows], kind, tile,
                            gather=None)
        out[(kind, with_keys, tile)] = (mean_over_ranks(loss).item(), grads)

    # the gather's own gradient, against torch.distributed.nn's (equal sizes only) and by hand
    from torch.distributed.nn.functional import all_gather as torch_all_gather

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(10 + rank), requires_grad=True)
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(20 + rank))
    (all_gather_with_grad(x) * w).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    (torch.cat(torch_all_gather(x)) * w).sum().backward()
    out["gather"] = (ours, x.grad.clone())

    # the starting weights, a value, and gradients some ranks lack
    from cliplab.train.distributed import (average_gradients, broadcast_from_rank0,
                                           broadcast_weights)

    module = torch.nn.Linear(2, 2)
    module.register_buffer("seen", torch.full((3,), float(rank)))
    torch.nn.init.constant_(module.weight, float(rank + 1))
    broadcast_weights(module)
    out["broadcast"] = (module.weight.detach().clone(), module.seen.clone(),
                        broadcast_from_rank0(f"runs/r{rank}"))
    every, some, none = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    every.grad = torch.tensor([1.0, 2.0]) * (rank + 1)
    some.grad = torch.tensor([4.0, 6.0]) if rank == 0 else None
    average_gradients([every, some, none])
    out["averaged"] = (every.grad, some.grad, none.grad)
    return out


def _worker(rank: int, world: int, port: int, out_dir: str, scenario: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from cliplab.errors import DistributedError
    from cliplab.train.distributed import collective_errors, init_distributed, shutdown

    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        init_distributed(backend="gloo", timeout_s=4.0 if scenario != "equivalence" else 60.0)
        if scenario == "equivalence":
            torch.save(_equivalence(rank), out)
            shutdown()
            return
        if rank == 1:  # the rank that fails
            if scenario == "dead":
                os._exit(3)
            time.sleep(120)  # "hung": alive but never joins the next collective
            return
        start = time.monotonic()
        img = F.normalize(torch.randn(4, 5), dim=-1).requires_grad_()
        try:
            with collective_errors("the loss step"):
                contrastive_loss(img, img.detach(), torch.tensor(0.0)).backward()
            torch.save({"error": None}, out)
        except DistributedError as e:
            torch.save({"error": str(e), "seconds": time.monotonic() - start}, out)
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _spawn(tmp_path: Path, scenario: str, wait_s: float = 180.0) -> list[mp.Process]:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path), scenario), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    procs[0].join(wait_s)
    return procs


def _stop(procs: list[mp.Process]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(10)


def _errors(tmp_path: Path) -> str:
    return "\n".join(f.read_text() for f in sorted(tmp_path.glob("*.err")))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    procs = _spawn(tmp, "equivalence")
    for p in procs:
        p.join(60)
    _stop(procs)
    assert all((tmp / f"rank{r}.pt").exists() for r in range(2)), _errors(tmp)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("kind,with_keys,tile", CASES)
def test_two_ranks_equal_one_process(two_ranks, kind, with_keys, tile):
    ref_loss, ref_grads = single_process_reference(kind, with_keys)
    for rank, results in enumerate(two_ranks):
        loss, grads = results[(kind, with_keys, tile)]
        assert abs(loss - ref_loss) < 1e-5, (rank, loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-5,
                                       msg=f"rank {rank} d/d {name}")


def test_gather_gradient_matches_torch_and_hand_sum(two_ranks):
    w = [torch.randn(6, 4, generator=torch.Generator().manual_seed(20 + r)) for r in range(2)]
    for rank, results in enumerate(two_ranks):
        ours, theirs = results["gather"]
        # d/dx_rank of sum_r <gather(x), w_r> = sum_r w_r[rows of rank]
        expected = (w[0] + w[1])[3 * rank:3 * rank + 3]
        torch.testing.assert_close(ours, expected)
        torch.testing.assert_close(theirs, expected)


def test_rank0s_weights_buffers_and_values_reach_every_rank(two_ranks):
    for rank, results in enumerate(two_ranks):
        weight, buffer, value = results["broadcast"]
        assert torch.equal(weight, torch.ones(2, 2)) and torch.equal(buffer, torch.zeros(3))
        assert value == "runs/r0"


def test_gradients_are_averaged_over_ranks_and_none_everywhere_stays_none(two_ranks):
    """Mean over the 2 ranks, a rank without a gradient counting zeros; a parameter no rank has
    a gradient for keeps none (as in one process: AdamW skips it rather than decaying it)."""
    for rank, results in enumerate(two_ranks):
        every, some, none = results["averaged"]
        torch.testing.assert_close(every, torch.tensor([1.5, 3.0]))  # ([1, 2] + [2, 4]) / 2
        torch.testing.assert_close(some, torch.tensor([2.0, 3.0]))  # ([4, 6] + 0) / 2
        assert none is None, rank


@pytest.mark.parametrize("scenario", ["dead", "hung"])
def test_a_failed_rank_ends_the_other_with_a_clear_error(tmp_path, scenario):
    start = time.monotonic()
    procs = _spawn(tmp_path, scenario, wait_s=90)
    try:
        elapsed = time.monotonic() - start
        assert not procs[0].is_alive(), "rank 0 hangs after its peer failed"
        result = torch.load(tmp_path / "rank0.pt", weights_only=False) \
            if (tmp_path / "rank0.pt").exists() else None
        assert result is not None, _errors(tmp_path)
        assert result["error"] is not None
        assert re.match(r"rank 0 of 2: all_(gather|reduce) of .* failed: another rank stopped or "
                        r"did not answer within the 4 s timeout", result["error"]), result["error"]
        assert "\n" not in result["error"]
        assert result["seconds"] < 30, result
        assert elapsed < 90
    finally:
        _stop(procs)


def test_init_distributed_reports_missing_torchrun_variables(monkeypatch):
    from cliplab.train.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ConfigError, match="LOCAL_RANK is not set"):
        init_distributed()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "five")
    with pytest.raises(ConfigError, match="RANK='five' is not an integer"):
        init_distributed()


def test_more_local_ranks_than_gpus_is_one_line(monkeypatch):
    """It was CUDA's 'invalid device ordinal' traceback from set_device."""
    from cliplab.train.distributed import init_distributed

    for name, value in (("WORLD_SIZE", "3"), ("RANK", "2"), ("LOCAL_RANK", "2"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29555")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device reached"))
    with pytest.raises(ConfigError, match=r"^distributed run: LOCAL_RANK=2, but this machine "
                       r"shows 2 GPU\(s\); launch at most that many ranks per node"):
        init_distributed("nccl")


def test_each_rank_joins_with_its_global_rank_on_its_local_gpu(monkeypatch):
    """Rank 3 of 4, the second on its node: GPU 1 (the local rank), the process group with rank
    3 and the timeout; the backend asked for wins over the default (gloo on a GPU machine runs
    on the CPU)."""
    from cliplab.train import distributed

    for name, value in (("WORLD_SIZE", "4"), ("RANK", "3"), ("LOCAL_RANK", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29555")):
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kw: calls.append((backend, kw)))
    info = distributed.init_distributed(timeout_s=7)
    assert calls == [("set_device", 1), ("nccl", {"rank": 3, "world_size": 4,
                                                  "timeout": timedelta(seconds=7)})]
    assert (info.rank, info.world_size, info.local_rank, info.device, info.backend) == (
        3, 4, 1, torch.device("cuda", 1), "nccl")
    calls.clear()
    info = distributed.init_distributed("gloo", timeout_s=7)
    assert calls == [("gloo", {"rank": 3, "world_size": 4, "timeout": timedelta(seconds=7)})]
    assert info.device == torch.device("cpu")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match=r"^distributed run: RANK=4 is outside "
                                          r"0\.\.WORLD_SIZE-1=3$"):
        distributed.init_distributed("gloo")


def test_single_process_without_torchrun(monkeypatch):
    from cliplab.train import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    assert not distributed.is_distributed() and distributed.world_size() == 1
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.all_gather_with_grad(x) is x


def test_collective_errors_translates_backend_errors_only():
    from cliplab.errors import DistributedError
    from cliplab.train.distributed import collective_errors

    with pytest.raises(DistributedError, match=r"rank 0 of 1: the step failed: another rank .*"
                                               r"Connection closed by peer"):
        with collective_errors("the step"):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer\nmore")
    for error in (torch.distributed.DistError("peer vanished"),
                  RuntimeError("NCCL communicator was aborted on rank 1")):
        with pytest.raises(DistributedError, match=r"the step failed: another rank"):
            with collective_errors("the step"):
                raise error
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        with collective_errors("the step"):
            torch.randn(2, 3) @ torch.randn(2, 3)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_fsdp_clip_grad_norm_is_torchs_in_one_process(max_norm):
    """One process, plain gradients (one of them missing): the norm and the clipped gradients
    are `torch.nn.utils.clip_grad_norm_`'s; below the norm they shrink, above it they stay."""
    from cliplab.train.fsdp import clip_grad_norm

    ours = [torch.nn.Parameter(torch.zeros(3, 4)) for _ in range(3)]
    theirs = [torch.nn.Parameter(torch.zeros(3, 4)) for _ in range(3)]
    g = torch.Generator().manual_seed(0)
    for a, b in zip(ours[:2], theirs[:2]):
        a.grad = torch.randn(3, 4, generator=g)
        b.grad = a.grad.clone()
    norm = clip_grad_norm(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    torch.testing.assert_close(norm, expected)
    assert 0.5 < norm < 100.0
    for a, b in zip(ours, theirs):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad)
    # the sums start where the parameters are (nccl reduces only GPU tensors), also when no
    # gradient moves them there: here the meta device
    meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    assert clip_grad_norm([meta], max_norm).device.type == "meta"


def test_a_second_join_in_one_process_is_one_clear_error(monkeypatch):
    """A second training in one torchrun launch (without a group of the script's own) failed
    late, as a peer's reset connection after a timeout: torch joins a group once only."""
    from cliplab.errors import DistributedError
    from cliplab.train import distributed

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29555")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "_joined_here", False)  # restored after the test
    monkeypatch.setattr(distributed, "_left_here", False)
    joined, joins = [False], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: joined[0])
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda *a, **kw: joins.append(a) or joined.__setitem__(0, True))
    monkeypatch.setattr(distributed.dist, "destroy_process_group",
                        lambda: joined.__setitem__(0, False))
    distributed.init_distributed()
    distributed.shutdown()
    with pytest.raises(DistributedError, match=r"^rank 1 of 2: this process already joined and "
                       r"left a process group .* make the group yourself "
                       r"\(torch\.distributed\.init_process_group\)"):
        distributed.init_distributed()
    assert joins == [("gloo",)]


def test_a_one_rank_group_keeps_arguments_checks_sizes_and_shuts_down(tmp_path):
    """In a process group of one (in this process): the logged mean leaves its argument as it
    was, gather sizes that do not match this rank are refused, and shutdown leaves the group."""
    from cliplab.train import distributed

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}",
                                         rank=0, world_size=1)
    try:
        loss = torch.tensor(3.0)
        assert distributed.mean_over_ranks(loss) == 3.0
        distributed.mean_over_ranks(loss).add_(1)
        assert loss == 3.0
        x = torch.ones(2, 3)
        assert torch.equal(distributed.all_gather_with_grad(x, [2]), x)
        with pytest.raises(ValueError, match=r"sizes \[3\] do not match"):
            distributed.all_gather_with_grad(x, [3])
        distributed.shutdown()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
