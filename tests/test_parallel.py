"""parallelize() (activation checkpointing, DDP, FSDP2) and the cross-rank accumulation on 2 gloo CPU ranks.

One module fixture spawns two ranks once; each runs every scenario on its share of a global batch and
saves the result; the tests compare with the single-process computation on the whole batch.
"""

from __future__ import annotations

import os
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from astrolabe.models.wan.config import tiny
from astrolabe.models.wan.dit import WanDiT
from astrolabe.parallel import (ParallelConfig, dit_of, parallelize, set_activation_checkpointing,
                                sum_gradients_across_ranks)
from astrolabe.rl.accumulation import accumulate_gradients, sample_weights
from astrolabe.rl.lora import LoRAConfig
from astrolabe.rl.optim import OptimConfig
from astrolabe.rl.policies import PolicyConfig, PolicySet
from astrolabe.rl.state import TrainingState
from spawn_helpers import free_port, run_ranks

N = 5  # global samples; rank 0 holds micro-batches of 1 and 2 samples, rank 1 one of 2 (unequal on purpose)
MICRO = {0: [(0, 1), (1, 3)], 1: [(3, 5)]}
LR = 0.5


def data(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 4, 4, generator=g)
    ctx = torch.randn(n, 4, 32, generator=g)
    target = torch.randn(n, 3, 16, 4, 4, generator=g)
    return x, torch.full((n,), 500.0), ctx, target


def mse(model, mb):
    x, t, ctx, target = mb
    return (model(x, t, ctx) - target).pow(2).mean()


def part(d, lo, hi):
    return tuple(v[lo:hi] for v in d)


def lora_state():
    dit = WanDiT(tiny())
    dit.init_weights(torch.Generator().manual_seed(0))
    ps = PolicySet.build(dit.requires_grad_(False), LoRAConfig(rank=4, alpha=8.0), PolicyConfig(),
                         generator=torch.Generator().manual_seed(7))
    with torch.no_grad():  # B != 0 so every LoRA tensor gets a gradient
        for p in ps.parameters_of("default").values():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return TrainingState(ps, OptimConfig(lr=1e-3, precision="fp32"))


def full_model():
    m = WanDiT(tiny())
    m.init_weights(torch.Generator().manual_seed(0))
    return m.train()


def sgd_step(model, batch):
    """One SGD step of the mean loss over ``batch``; returns the updated parameters by name (full tensors)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    mse(model, batch).backward()
    opt.step()
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------- ranks


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import astrolabe  # noqa: F401
    from astrolabe.distributed import init_distributed

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    init_distributed("cpu")
    out: dict = {}
    try:
        d = data()
        st = lora_state()
        mbs = [part(d, lo, hi) for lo, hi in MICRO[rank]]
        out["loss"] = accumulate_gradients(st, lambda mb: mse(st.policies.model, mb), mbs,
                                           [hi - lo for lo, hi in MICRO[rank]])  # across ranks: group initialised
        out["grads"] = {k: p.grad.clone() for k, p in st.policies.parameters_of("default").items()}
        half = part(d, 2 * rank, 2 * rank + 2)  # equal halves of the first 4 samples
        ac = ParallelConfig(strategy="ddp", activation_checkpointing=True)
        out["ddp"] = sgd_step(parallelize(full_model(), ac), half)
        fsdp = ParallelConfig(strategy="fsdp", activation_checkpointing=True, fsdp_param_dtype="float32")
        model = parallelize(full_model(), fsdp)
        out["fsdp_class"] = type(model.blocks[0]).__name__
        out["fsdp"] = sgd_step(model, half)
    except Exception:
        out["error"] = traceback.format_exc()
    finally:
        torch.save(out, Path(root) / f"rank{rank}.pt")
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    port = free_port()
    run_ranks(_worker, lambda r: (r, port, str(root)))
    out = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r, o in enumerate(out):
        assert "error" not in o, f"rank {r} failed:\n{o['error']}"
    return SimpleNamespace(r0=out[0], r1=out[1])


# ----------------------------------------------------------------------------------- tests


def test_two_rank_accumulation_equals_one_process_on_all_samples(ranks):
    st = lora_state()
    d = data()
    loss = accumulate_gradients(st, lambda mb: mse(st.policies.model, mb), [d], [N])
    assert ranks.r0["loss"] == pytest.approx(loss, rel=1e-6) and ranks.r1["loss"] == pytest.approx(loss, rel=1e-6)
    for k, p in st.policies.parameters_of("default").items():
        for r in (ranks.r0, ranks.r1):
            assert torch.allclose(r["grads"][k], p.grad, rtol=1e-6, atol=1e-6), k


def test_ddp_step_equals_the_one_process_step(ranks):
    want = sgd_step(full_model(), part(data(), 0, 4))
    for r in (ranks.r0, ranks.r1):
        got = {k.removeprefix("module."): v for k, v in r["ddp"].items()}
        assert got.keys() == want.keys()
        assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-5
    assert any(not torch.equal(want[k], full_model().state_dict()[k]) for k in want)  # the step moved weights


def test_fsdp2_step_equals_the_one_process_step_on_cpu_gloo(ranks):
    """FSDP2 fully_shard works on CPU with gloo in torch 2.13 (fp32 params here; bf16 is the default)."""
    assert ranks.r0["fsdp_class"] == "FSDPWanAttentionBlock"
    want = sgd_step(full_model(), part(data(), 0, 4))
    for r in (ranks.r0, ranks.r1):
        assert r["fsdp"].keys() == want.keys()
        assert max(float((r["fsdp"][k] - want[k]).abs().max()) for k in want) < 1e-5


# ----------------------------------------------------------------------------------- one process


def test_strategy_none_is_identity_plus_activation_checkpointing():
    m = full_model()
    assert parallelize(m, ParallelConfig(activation_checkpointing=True)) is m and m.gradient_checkpointing
    ps = PolicySet.build(full_model().requires_grad_(False), LoRAConfig(rank=2, alpha=2.0), PolicyConfig(),
                         generator=torch.Generator().manual_seed(0))
    assert parallelize(ps.model, ParallelConfig(activation_checkpointing=True)) is ps.model
    assert dit_of(ps.model).gradient_checkpointing  # found under the peft wrapper
    assert set_activation_checkpointing(ps.model, False) is True and not dit_of(ps.model).gradient_checkpointing
    with pytest.raises(RuntimeError, match="process group"):
        parallelize(full_model(), ParallelConfig(strategy="ddp"))
    with pytest.raises(ValueError, match="no fully_shard-ed module"):
        sum_gradients_across_ranks(full_model())


def test_parallel_config_defaults_and_validation():
    from astrolabe.config import load_config  # here: the spawned ranks import this module, keep it light

    cfg = load_config("configs/tiny.yaml")
    assert cfg.parallel == ParallelConfig(strategy="none", activation_checkpointing=False, fsdp_param_dtype="bfloat16")
    with pytest.raises(ValueError, match="parallel.strategy"):
        load_config("configs/tiny.yaml", ["parallel.strategy=zero3"])
    with pytest.raises(ValueError, match="unknown key"):
        load_config("configs/tiny.yaml", ["model.gradient_checkpointing=true"])  # moved to parallel.*


def test_sample_weights():
    assert sample_weights([1, 3], 4) == [0.25, 0.75]
    assert sample_weights([2], 5) == [0.4]  # a rank's share of a cross-rank total
    with pytest.raises(ValueError):
        sample_weights([0, 2], 2)
    with pytest.raises(ValueError):
        sample_weights([3], 2)
