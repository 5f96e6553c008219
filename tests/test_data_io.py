"""mp4 encode/decode, WebDataset rollout shards and zarr column stores."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from astrolabe.data import arrays
from astrolabe.data.arrays import KeyAlignmentError, add_columns, check_keys_aligned, read_columns, write_columns
from astrolabe.data.shards import (
    CorruptShardError,
    RolloutShardWriter,
    ShardWriterConfig,
    encode_record,
    index_shards,
    list_shards,
    read_rollout_shards,
)
from astrolabe.data.video import (
    Mp4Config,
    StreamingMp4Writer,
    as_uint8_hwc,
    decode_mp4,
    encode_mp4,
    grid_frames,
    save_grid_mp4,
    to_uint8_frames,
    write_mp4,
)

# ----------------------------------------------------------------------------------------------
# video


def smooth_video(f: int = 6, h: int = 64, w: int = 64) -> np.ndarray:
    """Low-frequency colour gradients that move over time: compress well, little chroma loss."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = [np.stack([xx * 2 + 8 * t, yy * 2 + 4 * t, (xx + yy) + 6 * t], -1) for t in range(f)]
    return (np.stack(frames) % 256).astype(np.uint8)  # (F, H, W, 3)


def test_mp4_round_trip_close_to_input():
    frames = smooth_video()
    data = encode_mp4(frames, fps=16, crf=0)
    assert data[4:8] == b"ftyp"
    out = decode_mp4(data)
    assert out.shape == frames.shape and out.dtype == np.uint8
    err = np.abs(out.astype(np.int16) - frames)
    assert err.mean() < 2.0 and err.max() <= 12  # yuv420p chroma subsampling is the only loss at crf 0


def test_mp4_keeps_frame_order_and_count():
    levels = [16, 80, 200, 40, 120]
    frames = np.stack([np.full((64, 64, 3), v, np.uint8) for v in levels])
    out = decode_mp4(encode_mp4(frames, fps=8, crf=0))
    np.testing.assert_allclose(out.reshape(len(levels), -1).mean(1), levels, atol=2)
    with pytest.raises(ValueError, match="not a readable video"):
        decode_mp4(b"garbage" * 100)


def test_streaming_writer_equals_one_shot(tmp_path):
    frames = smooth_video(f=7)
    one_shot = decode_mp4(encode_mp4(frames, fps=16, crf=0))
    path = tmp_path / "v.mp4"
    with StreamingMp4Writer(path, fps=16, crf=0) as w:
        w.write(frames[:2])
        w.write(frames[2:6].astype(np.float32) / 255.0)  # float chunks in [0, 1]
        w.write(frames[6])  # a single (H, W, 3) frame
        assert not path.exists()  # only the temporary file exists while writing
    assert w.n_frames == 7
    np.testing.assert_array_equal(decode_mp4(path), one_shot)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_streaming_writer_crash_leaves_nothing(tmp_path):
    path = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with StreamingMp4Writer(path) as w:
            w.write(smooth_video(f=2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_write_mp4_path_and_buffer(tmp_path):
    frames = smooth_video(f=3)
    buf = io.BytesIO()
    write_mp4(buf, frames, **Mp4Config(crf=0).encode_kwargs())
    write_mp4(tmp_path / "a.mp4", frames, fps=16, crf=0)
    np.testing.assert_array_equal(decode_mp4(buf.getvalue()), decode_mp4(tmp_path / "a.mp4"))


def test_odd_sizes_are_edge_padded():
    frames = smooth_video(f=2, h=63, w=65)
    out = decode_mp4(encode_mp4(frames, crf=0))
    assert out.shape == (2, 64, 66, 3)
    assert np.abs(out[:, :63, :65].astype(np.int16) - frames).mean() < 2.0
    # the padded row repeats the last input row
    assert np.abs(out[:, 63, :65].astype(np.int16) - frames[:, 62]).mean() < 3.0


def test_to_uint8_frames_values_and_layout():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0, 0.5]).reshape(1, 1, 3, 1, 2)  # (B, F, 3, H, W)
    u8 = to_uint8_frames(x)  # round(clip((x + 1) / 2) * 255)
    assert u8.shape == (1, 1, 1, 2, 3)
    # channel c, pixel w -> value x[c, w]: [[-1, 0], [1, 2], [-3, 0.5]]
    np.testing.assert_array_equal(u8[0, 0, 0], [[0, 255, 0], [128, 255, 191]])
    v = np.random.default_rng(0).random((4, 3, 5, 6), dtype=np.float32)  # (F, 3, H, W) in [0, 1]
    ref = np.rint(np.transpose(v, (0, 2, 3, 1)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(to_uint8_frames(v, value_range=(0, 1)), ref)
    with pytest.raises(ValueError, match="channel-first"):
        to_uint8_frames(np.zeros((2, 5, 5, 3), np.float32))


def test_as_uint8_hwc_rejects_signed_range():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        as_uint8_hwc(np.full((1, 2, 2, 3), -0.5, np.float32))


def test_grid_layout_labels_and_hold_last_frame(tmp_path):
    a = np.zeros((3, 64, 64, 3), np.uint8)
    a[:, :, :, 0] = 200  # red, 3 frames
    b = np.zeros((5, 64, 64, 3), np.uint8)
    b[:, :, :, 2] = np.arange(5)[:, None, None] * 40 + 40  # blue ramp, 5 frames
    grid = grid_frames([a, b], labels=["red", "blue"], gap=2)
    strip = 12  # max(12, 64 // 6)
    assert grid.shape == (5, strip + 64, 64 + 2 + 64, 3)
    assert (grid[4, strip:, :64] == [200, 0, 0]).all()  # video a holds its last frame
    np.testing.assert_array_equal(grid[:, strip + 5, 70, 2], [40, 80, 120, 160, 200])
    assert grid[0, :strip, :64].max() > 150 and grid[0, :strip, :64].min() == 0  # light label on black
    assert not np.array_equal(grid[0, :strip, :64], grid[0, :strip, 66:])  # two different labels
    path = save_grid_mp4(tmp_path / "grid.mp4", [a, b], labels=["red", "blue"], crf=0)
    out = decode_mp4(path)
    assert out.shape == (5, 76, 130, 3)
    assert abs(out[4, 40:70, 10:50, 0].mean() - 200) < 4


# ----------------------------------------------------------------------------------------------
# shards


def make_record(i: int, rng: np.random.Generator, mp4: bytes) -> dict:
    return {
        "key": f"g{i // 2:03d}-c{i % 2}",
        "latents": rng.standard_normal((2, 4, 3, 3)).astype(np.float16 if i % 2 else np.float32),
        "meta": {"prompt": f"a cat {i}", "group": i // 2, "candidate": i % 2, "window": [3, 6], "seeds": {"noise": i}},
        "video_mp4": mp4,
        "extras": {"noise_level": np.array([0.1 * i], np.float32)},
    }


@pytest.fixture(scope="module")
def tiny_mp4() -> bytes:
    return encode_mp4(smooth_video(f=2), crf=30)


def write_records(out_dir: Path, records: list[dict], config: ShardWriterConfig, rank: int = 0) -> list[Path]:
    with RolloutShardWriter(out_dir, "rollout", rank=rank, config=config) as w:
        for r in records:
            w.write(r["key"], r["latents"], r["meta"], video_mp4=r["video_mp4"], extras=r["extras"])
    return w.paths


def test_shard_round_trip_by_sample_count(tmp_path, tiny_mp4):
    rng = np.random.default_rng(0)
    records = [make_record(i, rng, tiny_mp4) for i in range(7)]
    paths = write_records(tmp_path, records, ShardWriterConfig(max_samples_per_shard=3), rank=2)
    assert [p.name for p in paths] == [f"rollout-r002-{i:06d}.tar" for i in range(3)]
    assert list_shards(tmp_path, "rollout") == paths  # no temporaries left
    assert len(list(tmp_path.iterdir())) == 3
    got = list(read_rollout_shards(paths))
    assert [g["__key__"] for g in got] == [r["key"] for r in records]
    for g, r in zip(got, records):
        assert g["latents"].dtype == r["latents"].dtype
        np.testing.assert_array_equal(g["latents"], r["latents"])
        assert g["meta"] == r["meta"]
        assert g["video"] == tiny_mp4
        np.testing.assert_array_equal(g["noise_level"], r["extras"]["noise_level"])
    assert [g["__shard__"] for g in got] == [str(paths[i // 3]) for i in range(7)]
    assert index_shards(paths) == [r["key"] for r in records]


def test_shards_readable_by_webdataset(tmp_path, tiny_mp4):
    import webdataset as wds

    rng = np.random.default_rng(1)
    records = [make_record(i, rng, tiny_mp4) for i in range(4)]
    paths = write_records(tmp_path, records, ShardWriterConfig(max_samples_per_shard=3))
    ds = wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode()
    got = [(s["__key__"], s["meta.json"], s["video.mp4"]) for s in ds]
    assert got == [(r["key"], r["meta"], tiny_mp4) for r in records]


def test_shards_bounded_by_bytes(tmp_path, tiny_mp4):
    rng = np.random.default_rng(2)
    records = [make_record(i, rng, tiny_mp4) for i in range(9)]
    for r in records:
        r["latents"] = r["latents"].astype(np.float32)  # same payload size for every record
    payload = sum(len(v) for k, v in encode_record(**records[0]).items() if k != "__key__")
    max_bytes = int(2.5 * payload)
    config = ShardWriterConfig(max_samples_per_shard=100, max_bytes_per_shard=max_bytes)
    paths = write_records(tmp_path, records, config)
    per_shard = math.ceil(max_bytes / payload)  # a shard closes once its payload reaches the bound
    assert per_shard == 3
    assert [len(index_shards([p])) for p in paths] == [3, 3, 3]


def test_shard_writer_validation(tmp_path):
    with RolloutShardWriter(tmp_path, "x") as w:
        with pytest.raises(ValueError, match="no dots"):
            w.write("a.b", np.zeros(2, np.float32), {})
        with pytest.raises(TypeError, match="bfloat16"):
            w.write("a", np.zeros(2, np.float64), {})
        with pytest.raises(ValueError, match="JSON"):
            w.write("a", np.zeros(2, np.float32), {"t": torch.zeros(1)})
        w.write("a", np.zeros(2, np.float32), {})
        with pytest.raises(ValueError, match="duplicate"):
            w.write("a", np.zeros(2, np.float32), {})
    with pytest.raises(ValueError, match="prefix"):
        RolloutShardWriter(tmp_path, "bad%prefix")


def test_shard_writer_crash_removes_partial_shard(tmp_path, tiny_mp4):
    rng = np.random.default_rng(3)
    with pytest.raises(RuntimeError, match="boom"):
        with RolloutShardWriter(tmp_path, "rollout", config=ShardWriterConfig(max_samples_per_shard=2)) as w:
            for i in range(3):
                r = make_record(i, rng, tiny_mp4)
                w.write(r["key"], r["latents"], r["meta"])
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollout-r000-000000.tar"]
    assert len(index_shards(list_shards(tmp_path))) == 2


def _member_boundaries(path: Path) -> list[int]:
    """Byte offsets just after each member's padded data."""
    with tarfile.open(path) as tf:
        return [m.offset_data + -(-m.size // 512) * 512 for m in tf.getmembers()]


@pytest.mark.parametrize("where", ["mid_data", "member_boundary", "garbage"])
def test_corrupt_shard_raises_naming_file(tmp_path, tiny_mp4, where):
    rng = np.random.default_rng(4)
    paths = write_records(tmp_path, [make_record(i, rng, tiny_mp4) for i in range(4)], ShardWriterConfig())
    path = paths[0]
    data = path.read_bytes()
    if where == "mid_data":
        path.write_bytes(data[: len(data) // 2 + 100])
    elif where == "member_boundary":
        cut = _member_boundaries(path)[5]  # after 6 of 16 members: no end-of-archive marker
        path.write_bytes(data[:cut])
    else:
        path.write_bytes(b"\x13" * 3000)
    with pytest.raises(CorruptShardError, match=path.name):
        list(read_rollout_shards(paths))
    with pytest.raises(CorruptShardError, match=path.name):
        index_shards(paths)


# ----------------------------------------------------------------------------------------------
# zarr columns


def test_columns_round_trip(tmp_path):
    keys = ["g0-c0", "g0-c1", "g1-c0"]
    cols = {"hpsv2": np.array([0.25, np.nan, -1.5]), "kl_mask": np.array([True, False, True])}
    path = write_columns(tmp_path / "rewards.zarr", keys, cols, {"reward": "hpsv2", "version": 2})
    k, c, a = read_columns(path)
    assert k == keys and list(c) == ["hpsv2", "kl_mask"] and a == {"reward": "hpsv2", "version": 2}
    assert c["hpsv2"].dtype == np.float32
    np.testing.assert_array_equal(c["hpsv2"], np.array([0.25, np.nan, -1.5], np.float32))
    np.testing.assert_array_equal(c["kl_mask"], [1.0, 0.0, 1.0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rewards.zarr"]


def test_add_columns_keeps_old(tmp_path):
    path = write_columns(tmp_path / "r.zarr", ["a", "b"], {"x": [1.0, 2.0]}, {"keep": 1})
    add_columns(path, {"y": [3.0, np.nan]}, attrs={"new": True})
    k, c, a = read_columns(path)
    assert k == ["a", "b"] and list(c) == ["x", "y"] and a == {"keep": 1, "new": True}
    np.testing.assert_array_equal(c["x"], [1.0, 2.0])
    with pytest.raises(ValueError, match="overwrite=True"):
        add_columns(path, {"x": [0.0, 0.0]})
    add_columns(path, {"x": [5.0, 6.0]}, overwrite=True)
    np.testing.assert_array_equal(read_columns(path)[1]["x"], [5.0, 6.0])
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        add_columns(path, {"z": [1.0]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]


def test_add_columns_failure_keeps_original(tmp_path, monkeypatch):
    path = write_columns(tmp_path / "r.zarr", ["a", "b"], {"x": [1.0, 2.0]})
    real = arrays._write_store

    def failing(p, keys, columns, attrs):
        real(p, keys, {"x": columns["x"]}, attrs)  # half written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(arrays, "_write_store", failing)
    with pytest.raises(OSError, match="(?i)no space"):
        add_columns(path, {"y": [3.0, 4.0]})
    k, c, _ = read_columns(path)
    assert list(c) == ["x"] and sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]


def test_column_validation_and_key_alignment(tmp_path):
    with pytest.raises(ValueError, match="no '/'"):
        write_columns(tmp_path / "a.zarr", ["a"], {"reward/x": [1.0]})
    with pytest.raises(ValueError, match="duplicate key"):
        write_columns(tmp_path / "a.zarr", ["a", "a"], {"x": [1.0, 2.0]})
    check_keys_aligned(["a", "b"], ["a", "b"])
    with pytest.raises(KeyAlignmentError, match="row 1: 'c' vs shard record 'b'"):
        check_keys_aligned(["a", "c"], ["a", "b"])
    with pytest.raises(KeyAlignmentError, match="1 keys vs 2"):
        check_keys_aligned(["a"], ["a", "b"])


def test_mp4_encoding_is_bit_reproducible():
    """Stored rollouts are re-scored and compared across resumes: the same frames must give the same bytes."""
    import hashlib

    from astrolabe.data.video import encode_mp4

    rng = np.random.default_rng(0)
    v = rng.integers(0, 256, size=(9, 64, 64, 3), dtype=np.uint8)
    assert len({hashlib.sha256(encode_mp4(v, fps=16)).hexdigest() for _ in range(30)}) == 1
