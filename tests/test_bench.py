import json
import math

import pytest
import torch
from typer.testing import CliRunner

from astrolabe.bench import LiveTensorPeak, StreamSetup, gpu, rollout, update
from flows.cli import app


def _positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_live_tensor_peak_counts_exactly():
    before = torch.zeros(10_000)
    with LiveTensorPeak() as mode:
        before[:10].sum()  # a view of an old tensor is not new memory; the 4-byte sum is, briefly
        a = torch.ones(1000, dtype=torch.float32)  # 4000 B
        b = a * 2  # +4000 B -> 8000 live
        del a, b
        c = torch.ones(500, dtype=torch.float64)  # 4000 B
        c.view(50, 10).add_(1)  # a view: no new storage
    assert mode.peak == 8000 and mode.live == 4000
    del c


def test_rollout_bench_smoke():
    r = rollout.run(
        long_frames=12, short_frames=3, edge_blocks=1, baseline_frames=6, branch_k=2, branch_prefix_frames=3,
        branch_frames=3, setup=StreamSetup(latent_hw=(4, 4), window=6), fresh_process=False,
    )  # fmt: skip
    for k in ("peak_memory_ratio", "time_ratio_last_first", "kv_cache_speedup", "branch_speedup"):
        assert k in r
    for k in ("time_ratio_last_first", "kv_cache_speedup", "branch_speedup", "tensor_peak_ratio"):
        assert _positive(r[k]), k
    assert len(r["timing"]["block_times_s"]) == 4
    assert _positive(r["memory"]["long"]["tensor_peak_bytes"])
    assert "rollout bench" in rollout.format_table(r).title


def test_update_scaling_bench_runs_two_ranks_and_writes_the_numbers(tmp_path):
    """`astrolabe bench update --world-size 2`: world size 1 and 2 measured in one run (no timing assertions)."""
    out = tmp_path / "scaling.json"
    res = CliRunner().invoke(app, ["bench", "update", "--world-size", "2", "--json", str(out)],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert [row["world_size"] for row in r["rows"]] == [1, 2] and r["settings"]["backend"] == "gloo"
    assert [row["samples"] for row in r["rows"]] == [3, 6]  # 3 steps x 1 sample per rank
    for k in ("speedup", "scaling_efficiency"):
        assert _positive(r[k]), k
    assert all(_positive(row["samples_per_s"]) for row in r["rows"])
    assert "update scaling bench" in res.output
    with pytest.raises(ValueError, match="world_size must be >= 2"):
        update.run_scaling(1)


def test_update_bench_smoke():
    r = update.run(
        prefix_frames=(0, 3), window_frames=3, setup=StreamSetup(latent_hw=(4, 4), window=6), fresh_process=False
    )
    assert set(r["rows"]) == {"window", "whole"}
    for mode in ("window", "whole"):
        for row in r["rows"][mode]:
            assert not row["oom"] and _positive(row["time_s"]) and _positive(row["tensor_peak_bytes"])
    # with no prefix the window update and the whole-sequence update are the same computation
    assert abs(r["rows"]["window"][0]["loss"] - r["rows"]["whole"][0]["loss"]) < 1e-6
    for k in ("window_tensor_peak_ratio", "window_vs_whole_tensor_peak_at_max", "window_time_ratio"):
        assert _positive(r[k]), k
    assert "update bench" in update.format_table(r).title



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_variants_small():
    r = rollout.run_gpu(long_frames=12, short_frames=3, edge_blocks=1, baseline_frames=6, branch_k=2,
                        branch_prefix_frames=3, branch_frames=3)  # fmt: skip
    assert _positive(r["memory"]["long"]["cuda_peak_bytes"]) and _positive(r["kv_cache_speedup"])
    u = update.run_gpu(prefix_frames=(0, 21), window_frames=21)
    assert all(not row["oom"] and _positive(row["cuda_peak_bytes"]) for rows in u["rows"].values() for row in rows)


# ----------------------------------------------------------------------------------- bench gpu (tiny on CPU)


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bench_gpu_tiny_cli_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "gpu", "--tiny", "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    for name in ("rollout", "rollout_decode"):
        sec = r[name]
        assert sec["latent_frames"] == (12 if name == "rollout" else 3)
        assert _finite_positive(sec["pixel_fps"]) and sec["pixel_fps"] == pytest.approx(4 * sec["latent_fps"])
        assert sec["kv_cache_bytes"] > 0 and sec["attention_backend"] == "sdpa"
    u = r["update"]
    assert u["lora_rank"] == 4 and u["trainable_parameters"] > 0
    for mode in ("window", "whole"):
        assert not u[mode]["oom"] and _finite_positive(u[mode]["s_per_step"]) and math.isfinite(u[mode]["loss"])
    assert "rollout_14b" not in r and any("rollout_14b" in n for n in r["notes"])
    assert r["total_seconds"] < 60


def test_budget_skips_sections_with_a_note():
    r = gpu.run(gpu.tiny_plan(budget_s=-1.0))
    assert not any(k in r for k in ("rollout", "rollout_decode", "update"))
    assert sum("skipped" in n for n in r["notes"]) == 4


def test_device_init_and_memory_estimate():
    m = gpu.random_model(lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)), "cpu", torch.float64)
    assert all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in m.parameters())
    assert torch.equal(m[1].weight, torch.ones(4))
    # 14B: 14.3e9 bf16 weights (~26.6 GiB) + window-12 KV cache (14.3 GiB at 480x832) + 25%
    need = gpu.big_model_need_bytes(gpu.gpu_plan(), "wan21_t2v_14b") / 2**30
    assert 48 < need < 56


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_gpu_short_on_cuda():
    r = gpu.run(gpu.gpu_plan(rollout_frames=12, decode_frames=6, update_prefix_frames=3, update_window_frames=3,
                             big_size=None))  # fmt: skip
    assert r["rollout"]["pixel_fps"] > 0 and not r["update"]["window"]["oom"]


def test_attention_backend_resolution_on_cpu():
    from astrolabe.models.wan.attention import resolve_backend

    assert resolve_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    assert resolve_backend("sdpa", "cpu", torch.float32) == "sdpa"
    with pytest.raises(RuntimeError, match="model.attention_backend=flash needs"):
        resolve_backend("flash", "cpu", torch.bfloat16)
    res = CliRunner().invoke(app, ["bench", "gpu", "--tiny", "--attention-backend", "flash"])
    assert res.exit_code != 0 and "flash" in res.output
