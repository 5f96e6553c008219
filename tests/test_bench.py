import math

import pytest
import torch

from astrolabe.bench import LiveTensorPeak, StreamSetup, rollout, update


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
