"""AR-CoPO under torchrun: the update and the merge-sweep evaluation on 2 gloo ranks equal one process.

One process builds the inputs (prompts, semi buffer, rollout, scores, labels, base-model evaluation) and the
single-process references (``nft_update`` iteration 0 with the on-policy and the semi adapters, ``evaluate``
iteration 1 = the merge sweep). Two spawned gloo ranks then run the same two stages through the run engine
(:func:`astrolabe.artifacts.engine.execute`), the update under DDP: every optimizer step's (group, step)
micro-batches are sliced across the ranks (a group cut between them), the evaluation plan (of the one-process
checkpoint) too. The adapters,
the optimizer state and the generators of both training states, the metrics, and every scale's reward table
must equal the single-process run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spawn_helpers import free_port, run_ranks
from astrolabe.artifacts.engine import execute
from astrolabe.artifacts.manifest import Manifest
from astrolabe.artifacts.stagedir import stage_root
from astrolabe.config import load_config
from astrolabe.data.arrays import read_columns
from stages import arcopo_buffer, evaluate, filter_prompts, label_uncertainty, nft_update, rollout, score

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-arcopo.yaml"
OVERRIDES = [
    "rollout.prompts_per_iteration=3", "rollout.group_size=3", "rollout.num_latent_frames=9", "arcopo.anchors=2",
    "rl.optim.precision=fp32", "rl.optim.lr=1e-3", "rl.lora.rank=4", "rl.lora.alpha=4", "rl.epochs=2",
    "rl.accumulation_steps=2",  # steps of 2 groups and of 1 group: both cut between the ranks
    "arcopo.semi.groups=2", "arcopo.semi.groups_per_part=2", "arcopo.semi.groups_per_iteration=2",
    "arcopo.merge.scales=[0.0,1.0]", "pipeline.eval_max_prompts=1", "pipeline.eval_seeds=[1000,1001,1002]",
]
ATOL = 1e-5
pytestmark = pytest.mark.slow  # two spawned ranks, about a minute on 2 cores


def _cfg(root: Path, *extra: str):
    return load_config(CONFIG, [*OVERRIDES, f"pipeline.runs_root={root}", *extra])


def _dir(run: Path, m: Manifest) -> Path:
    return stage_root(run, m.stage, m.iteration) / m.key


def _train_and_evaluate(cfg, run: Path, inputs: dict[str, Path], baseline: Path,
                        evaluated: Path | None = None) -> tuple[Path, Path]:  # fmt: skip
    """The update, then the merge sweep of ``evaluated`` (default: that update's output)."""
    upd = _dir(run, execute(nft_update, cfg, run, inputs, 0))
    ckpt = evaluated if evaluated is not None else upd
    ev = execute(evaluate, cfg, run, {"prompts": inputs["prompts"], "checkpoint": ckpt, "baseline": baseline}, 1)
    return upd, _dir(run, ev)


def _rank_worker(rank: int, port: int, root: str, inputs: dict[str, str], baseline: str, evaluated: str) -> None:
    """One of two gloo ranks: the update (DDP) and the merge sweep of the one-process update's checkpoint (the
    evaluation's slicing alone, not the update's float noise through the videos' 8-bit pixels)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from astrolabe.distributed import init_distributed

    init_distributed("cpu")
    try:
        cfg = _cfg(Path(root), "parallel.strategy=ddp")
        upd, ev = _train_and_evaluate(cfg, Path(root) / "ranks", {k: Path(v) for k, v in inputs.items()},
                                      Path(baseline), Path(evaluated))
        Path(root, f"done-r{rank}.json").write_text(json.dumps({"update": str(upd), "evaluate": str(ev)}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("arcopo-ranks")
    cfg, run = _cfg(root), root / "one"
    p = _dir(run, execute(filter_prompts, cfg, run, {}))
    buf = _dir(run, execute(arcopo_buffer, cfg, run, {"prompts": p}))
    r = _dir(run, execute(rollout, cfg, run, {"prompts": p}, 0))
    s = _dir(run, execute(score, cfg, run, {"rollout": r}, 0))
    lab = _dir(run, execute(label_uncertainty, cfg, run, {"rollout": r, "score": s}, 0))
    baseline = _dir(run, execute(evaluate, cfg, run, {"prompts": p}, 0))
    inputs = {"prompts": p, "rollout": r, "labels": lab, "buffer": buf}
    one = _train_and_evaluate(cfg, run, inputs, baseline)
    port = free_port()
    codes = run_ranks(_rank_worker, lambda k: (k, port, str(root), {k_: str(v) for k_, v in inputs.items()},
                                               str(baseline), str(one[0])), timeout=600)
    assert codes == [0, 0]
    done = [json.loads((root / f"done-r{k}.json").read_text()) for k in range(2)]
    assert done[0] == done[1], "every rank returns the one published output"
    return one, (Path(done[0]["update"]), Path(done[0]["evaluate"]))


# ----------------------------------------------------------------------------------- comparison helpers


def _state_tensors(state: Path) -> dict[str, torch.Tensor]:
    """Adapters (trained, old, ...) and every optimizer / scheduler tensor of a TrainingState directory."""
    out = {}
    for f in [state / "lora" / "adapter_model.safetensors", *sorted((state / "adapters").glob("*.safetensors"))]:
        out |= {f"{f.relative_to(state)}:{k}": v for k, v in load_file(f).items()}

    def walk(prefix: str, x) -> None:
        if isinstance(x, torch.Tensor):
            out[prefix] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}/{i}", v)
        elif isinstance(x, (int, float)):
            out[prefix] = torch.tensor(float(x))

    walk("optimizer", torch.load(state / "optimizer.pt", weights_only=False))
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ----------------------------------------------------------------------------------- tests


def test_two_rank_arcopo_update_equals_one_process(runs):
    (upd1, _), (upd2, _) = runs
    m1, m2 = Manifest.load(upd1), Manifest.load(upd2)
    assert m2.world_size == 2 and m2.extra["world_size"] == 2 and m1.world_size == 1
    assert m1.counts == m2.counts and m1.counts["trained_groups"] == 3 and m1.counts["buffer_groups"] == 2
    for sub in (nft_update.STATE_SUBDIR, "state_semi"):
        a, b = _state_tensors(upd1 / sub), _state_tensors(upd2 / sub)
        worst = _max_diff(a, b)
        print(f"arcopo 2 ranks vs 1 process: {sub} adapters + optimizer max abs diff {worst:.3g}")
        assert worst <= ATOL, f"{sub}: {worst:.3g}"
        assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # it trained
        # the generators (shuffle, anchors, buffer) continue identically on every rank
        r1, r2 = (torch.load(u / sub / "rng.pt", weights_only=False)["torch_generators"] for u in (upd1, upd2))
        assert r1.keys() == r2.keys() and all(torch.equal(r1[k], r2[k]) for k in r1)
        s1, s2 = (json.loads((u / sub / "state.json").read_text())["step"] for u in (upd1, upd2))
        assert s1 == s2 == {"state": 2 * 2, "state_semi": 2 * 1}[sub]  # epochs x ceil(groups / 2)
    assert m1.metrics.keys() == m2.metrics.keys()
    for k in m1.metrics:
        if not k.startswith(("time/", "memory/")):  # the engine's own wall time and peak memory
            assert m2.metrics[k] == pytest.approx(m1.metrics[k], rel=1e-4, abs=1e-7), k


def test_two_rank_merge_sweep_equals_one_process(runs):
    (_, ev1), (_, ev2) = runs
    m1, m2 = Manifest.load(ev1), Manifest.load(ev2)
    assert m2.world_size == 2 and m1.counts == m2.counts and m1.counts["videos"] == 3
    assert m1.metrics["eval/merge/s"] == m2.metrics["eval/merge/s"]
    assert m1.metrics.keys() == m2.metrics.keys()
    assert all(abs(m1.metrics[k] - m2.metrics[k]) <= ATOL for k in m1.metrics if k.startswith("eval/"))
    worst = 0.0
    for sub in ["", *(f"merge/s{s:g}" for s in (0.0, 1.0))]:
        (k1, c1, _), (k2, c2, _) = read_columns(ev1 / sub / "eval_rewards.zarr"), read_columns(ev2 / sub / "eval_rewards.zarr")
        assert k1 == k2 and c1.keys() == c2.keys()
        worst = max(worst, *(float(np.nanmax(np.abs(c1[c] - c2[c]))) for c in c1 if np.isfinite(c1[c]).any()))
        assert not list((ev2 / sub).glob("eval_rewards-r*.zarr"))  # the rank parts were merged and removed
        assert sorted(p.name for p in (ev2 / sub / "videos").iterdir()) == sorted(
            p.name for p in (ev1 / sub / "videos").iterdir())
    print(f"arcopo merge sweep 2 ranks vs 1 process: reward max abs diff {worst:.3g}")
    assert worst <= ATOL
