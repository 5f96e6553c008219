"""The procedural world: grammar, split, rendering, detector accuracy, and the verifiable rewards."""

from __future__ import annotations

import dataclasses
import itertools
import math

import cv2
import numpy as np
import pytest
import torch

from astrolabe.data.prompts import PromptFilterConfig, filter_prompts, read_prompt_file
from astrolabe.data.video import decode_mp4, encode_mp4
from astrolabe.rewards import RewardSpec, build_rewards, registered_rewards, score_all
from astrolabe.world.dataset import training_batch, training_pair, training_pairs
from astrolabe.world.detector import classify, detect_clip
from astrolabe.world.grammar import (
    COLORS,
    DIRECTIONS,
    PALETTE,
    SHAPES,
    SPEEDS,
    WorldCaption,
    WorldCaptionError,
    all_captions,
    heldout_captions,
    heldout_triples,
    parse_caption,
    train_captions,
    try_parse_caption,
)
from astrolabe.world.preview import contact_sheet, save_contact_sheet
from astrolabe.world.render import WorldConfig, render, render_caption, render_scene_prompt

CONFIG = WorldConfig()
ATTRIBUTES = ("color", "shape", "direction", "speed", "background")
WORLD_REWARDS = ("world_alignment", "world_quality", "world_motion")


def hwc(frames: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) -> (T, H, W, 3) float32: the rewards' layout."""
    return frames.permute(0, 2, 3, 1).numpy()


def detect(video: np.ndarray):
    return classify(detect_clip(video, np.arange(len(video)) / CONFIG.fps), CONFIG)


@pytest.fixture(scope="module")
def rewards():
    return build_rewards([RewardSpec(name=name) for name in WORLD_REWARDS])


@pytest.fixture(scope="module")
def ground_truth() -> tuple[list[WorldCaption], np.ndarray]:
    """200 rendered videos of random complete captions: (captions, (200, T, H, W, 3))."""
    pool = all_captions()
    rng = np.random.default_rng(2024)
    captions = [pool[int(i)] for i in rng.integers(len(pool), size=200)]
    videos = np.stack([hwc(render(c, np.random.default_rng(1000 + i)).frames) for i, c in enumerate(captions)])
    return captions, videos


def accuracy(captions: list[WorldCaption], videos: np.ndarray) -> dict[str, float]:
    """Share of videos whose detected attribute equals the rendered one (speed: over moving videos)."""
    predicted = [detect(v) for v in videos]
    out = {}
    for name in ATTRIBUTES:
        pairs = [(getattr(c, name), getattr(p, name) if p else None) for c, p in zip(captions, predicted)]
        pairs = [(truth, guess) for truth, guess in pairs if truth is not None]
        out[name] = sum(truth == guess for truth, guess in pairs) / len(pairs)
    return out


# --------------------------------------------------------------------------------------------------
# Grammar and split
# --------------------------------------------------------------------------------------------------


def test_grammar_round_trip_and_every_word_matters() -> None:
    captions = all_captions()
    assert len(captions) == 6 * 3 * 9 * 5 and len({c.text for c in captions}) == len(captions)
    for caption in captions:
        assert parse_caption(caption.text) == caption and caption.complete
    caption = parse_caption("A  Red circle moving LEFT slowly on a blue background.")
    assert caption == WorldCaption("circle", "red", "left", "slow", "blue")
    assert caption.text == "a red circle moving left slowly on a blue background"
    assert parse_caption("a green triangle staying still on a white background").direction == "still"
    # shorter captions name fewer attributes
    assert parse_caption("a red circle moving left").named == {"color": "red", "shape": "circle", "direction": "left"}
    assert parse_caption("a square").named == {"shape": "square"}
    # every word matters: replacing any one word gives another caption or no caption
    words = "a red circle moving left slowly on a blue background".split()
    for i, replacement in itertools.product(range(len(words)), ["green", "square", "right", "quickly", "the", "xyz"]):
        if replacement != words[i]:
            changed = " ".join(words[:i] + [replacement] + words[i + 1 :])
            assert try_parse_caption(changed) != caption
    for bad in ("a red dog", "a red circle moving sideways", "a red circle on a red background", "", "a circle staying still slowly"):
        with pytest.raises(WorldCaptionError):
            parse_caption(bad)
    with pytest.raises(WorldCaptionError, match="speed needs a moving direction"):
        WorldCaption("circle", "red", "still", "slow", "blue")


def test_split_disjoint_in_combinations_and_covering_every_value() -> None:
    train, heldout = train_captions(), heldout_captions()
    assert train == train_captions() and heldout == heldout_captions()  # fixed seed
    held = heldout_triples()
    assert len(held) == 18 and {c.triple for c in heldout} == held
    assert not {c.triple for c in train} & held
    assert len(train) + len(heldout) == len(all_captions()) and not {c.text for c in train} & {c.text for c in heldout}
    for name, values in (("color", COLORS), ("shape", SHAPES), ("direction", DIRECTIONS), ("speed", SPEEDS), ("background", COLORS)):
        assert {getattr(c, name) for c in train} >= set(values), name
        assert {getattr(c, name) for c in heldout} >= set(values), name
    # every (colour, direction) and (shape, direction) pair is seen in training: only triples are new
    assert {(c.color, c.direction) for c in train} == set(itertools.product(COLORS, DIRECTIONS))
    assert {(c.shape, c.direction) for c in train} == set(itertools.product(SHAPES, DIRECTIONS))
    assert heldout_triples(seed=1) != held


def test_packaged_prompt_files_are_the_split_and_survive_the_filter() -> None:
    for name, captions in (("builtin:world/train.txt", train_captions()), ("builtin:world/heldout.txt", heldout_captions())):
        lines = read_prompt_file(name)
        assert [line.text for line in lines] == [c.text for c in captions]  # regenerate: write_prompt_files
        assert filter_prompts(lines, PromptFilterConfig()).counts["kept"] == len(captions)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def test_render_is_deterministic_per_seed_and_keeps_the_object_in_frame() -> None:
    text = "a red triangle moving right quickly on a blue background"
    a = render_caption(text, np.random.default_rng(7))
    b = render_caption(text, np.random.default_rng(7))
    c = render_caption(text, np.random.default_rng(8))
    assert a.frames.shape == (17, 3, 64, 64) and a.frames.dtype == torch.float32
    assert torch.equal(a.frames, b.frames) and not torch.equal(a.frames, c.frames)
    assert 0.0 <= float(a.frames.min()) and float(a.frames.max()) <= 1.0
    assert a.caption == text and a.attributes == parse_caption(text)
    t1 = render_caption("a circle", torch.Generator().manual_seed(3))
    t2 = render_caption("a circle", torch.Generator().manual_seed(3))
    assert torch.equal(t1.frames, t2.frames) and t1.attributes == t2.attributes and t1.attributes.complete
    # the fast object moves 0.4 * 64 / 16 = 1.6 px per frame to the right, never touching the border
    assert np.allclose(np.diff(a.centers, axis=0), [[1.6, 0.0]])
    background = torch.tensor(PALETTE["blue"])[:, None]
    for seed in range(20):
        frames = render_caption(text, np.random.default_rng(seed)).frames
        border = torch.cat([frames[..., 0, :], frames[..., -1, :], frames[..., :, 0], frames[..., :, -1]], dim=-1)
        assert torch.allclose(border, background.expand_as(border[0]))
    assert len({tuple(np.round(render_caption(text, np.random.default_rng(s)).centers[0])) for s in range(10)}) > 5


def test_render_rejects_clips_the_object_cannot_stay_in() -> None:
    with pytest.raises(ValueError, match="leaves the frame"):
        render_caption("a red circle moving left quickly", np.random.default_rng(0), num_frames=40)
    with pytest.raises(ValueError, match="fast_speed"):
        WorldConfig(num_frames=60)
    assert render_caption("a red circle moving left slowly", np.random.default_rng(0), num_frames=40).frames.shape[0] == 40


def test_scene_prompt_renders_consecutive_scenes() -> None:
    text = "a red circle moving left[1s] | a blue square moving up"
    video = render_scene_prompt(text, np.random.default_rng(0), num_frames=34)
    again = render_scene_prompt(text, np.random.default_rng(0), num_frames=34)
    assert torch.equal(video.frames, again.frames) and video.frames.shape == (34, 3, 64, 64)
    assert video.starts == (0, 16) and [len(s.frames) for s in video.scenes] == [16, 18]
    first, second = (s.attributes for s in video.scenes)
    assert (first.color, first.shape, first.direction) == ("red", "circle", "left")
    assert (second.color, second.shape, second.direction) == ("blue", "square", "up")
    assert second.background == first.background and second.speed == first.speed  # unnamed: carried over
    assert np.allclose(video.scenes[1].centers[0][0], video.scenes[0].centers[-1][0])  # continues in x
    for scene, start in zip(video.scenes, video.starts):
        clip = hwc(video.frames[start : start + len(scene.frames)])
        assert detect(clip).named == scene.attributes.named


# --------------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------------


def test_detector_accuracy_on_200_ground_truth_videos(ground_truth) -> None:
    captions, videos = ground_truth
    acc = accuracy(captions, videos)
    assert min(acc.values()) >= 0.95, acc


def test_detector_is_robust_to_noise_and_blur(ground_truth) -> None:
    captions, videos = ground_truth
    rng = np.random.default_rng(0)
    noisy = np.clip(videos[:40] + rng.normal(0.0, 0.03, videos[:40].shape), 0.0, 1.0).astype(np.float32)
    blurred = np.stack([[cv2.GaussianBlur(f, (0, 0), 1.0) for f in v] for v in videos[40:80]])
    for name, batch, truth in (("noise", noisy, captions[:40]), ("blur", blurred, captions[40:80])):
        acc = accuracy(truth, batch)
        assert min(acc.values()) >= 0.95, (name, acc)


def test_detector_and_rewards_on_mp4_round_trip(ground_truth, rewards) -> None:
    captions, videos = ground_truth
    decoded = np.stack([decode_mp4(encode_mp4(np.rint(v * 255).astype(np.uint8))) for v in videos[:24]])
    assert decoded.dtype == np.uint8 and decoded.shape == videos[:24].shape
    acc = accuracy(captions[:24], decoded.astype(np.float32) / 255)
    assert min(acc.values()) >= 0.95, acc
    out = score_all(rewards, decoded, [c.text for c in captions[:24]])
    for name in WORLD_REWARDS:
        assert float(out[name].scores.min()) >= 0.9, (name, out[name].scores)


# --------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------


def test_world_rewards_are_registered() -> None:
    assert set(WORLD_REWARDS) <= set(registered_rewards())
    for reward in build_rewards([RewardSpec(name=name, options={"world": {"fps": 16.0}}) for name in WORLD_REWARDS]):
        assert reward.checkpoint_hash() is None and reward.identity()["options"]["world"]["height"] == 64


def test_rewards_are_one_on_ground_truth_and_lower_on_wrong_captions(ground_truth, rewards) -> None:
    captions, videos = ground_truth
    out = score_all(rewards, videos[:40], [c.text for c in captions[:40]])
    for name in WORLD_REWARDS:
        assert float(out[name].scores.min()) >= 0.99, name
    assert float(out["world_alignment"].details["exact"].min()) == 1.0
    for attribute in ("color", "shape", "direction", "background"):
        wrong = [_mutate(c, attribute).text for c in captions[:20]]
        scores = score_all(rewards[:1], videos[:20], wrong)["world_alignment"]
        assert float(scores.scores.max()) <= 0.81, attribute  # one of 4-5 attributes missing
        assert float(np.nanmax(scores.details[attribute])) < 0.1, attribute
    other = score_all(rewards, videos[:2], ["a cat playing piano", "a red circle | moving"])
    assert np.isnan(other["world_alignment"].scores).all()
    assert np.isfinite(other["world_quality"].scores).all() and np.isfinite(other["world_motion"].scores).all()


def _mutate(caption: WorldCaption, attribute: str) -> WorldCaption:
    """The caption with ``attribute`` set to another valid value."""
    if attribute == "direction":
        direction = next(d for d in DIRECTIONS if d != caption.direction)
        return dataclasses.replace(caption, direction=direction, speed=None if direction == "still" else "slow")
    if attribute == "shape":
        return dataclasses.replace(caption, shape=next(s for s in SHAPES if s != caption.shape))
    value = next(c for c in COLORS if c not in (caption.color, caption.background))
    return dataclasses.replace(caption, **{attribute: value})


def test_alignment_ranks_near_misses_by_colour_distance(rewards) -> None:
    caption = WorldCaption("square", "red", "still", None, "white")
    alpha = render(caption, np.random.default_rng(0)).frames  # white background, red square
    red, blue, white = (torch.tensor(PALETTE[c])[:, None, None] for c in ("red", "blue", "white"))
    mask = ((alpha - white).abs().sum(1, keepdim=True) > 0.01).float()  # (T, 1, H, W) object pixels
    scores = []
    for w in (0.0, 0.15, 0.3, 0.45, 1.0):
        colour = (1 - w) * red + w * blue
        video = (1 - mask) * white + mask * colour
        scores.append(float(rewards[0](hwc(video)[None], [caption.text]).details["color"][0]))
    assert scores[0] == 1.0 and scores[-1] == 0.0
    assert all(a >= b for a, b in zip(scores, scores[1:])) and 0.0 < scores[2] < 1.0


def test_wrong_video_scores_lower_than_the_right_one(rewards) -> None:
    text = "a yellow circle moving down quickly on a purple background"
    right = hwc(render_caption(text, np.random.default_rng(1)).frames)
    for wrong_text in (text.replace("yellow", "green"), text.replace("down", "up"), text.replace("quickly", "slowly")):
        wrong = hwc(render_caption(wrong_text, np.random.default_rng(1)).frames)
        scores = rewards[0](np.stack([right, wrong]), [text, text]).scores
        assert scores[0] == pytest.approx(1.0) and scores[1] <= 0.81, wrong_text


def test_quality_and_motion_penalise_defects(rewards) -> None:
    base = hwc(render_caption("a green square moving right slowly on a white background", np.random.default_rng(3)).frames)
    prompt = "a green square moving right slowly on a white background"

    def score(video: np.ndarray) -> dict[str, float]:
        out = score_all(rewards, video[None], [prompt])
        return {name: float(o.scores[0]) for name, o in out.items()}

    clean = score(base)
    assert clean["world_quality"] >= 0.99 and clean["world_motion"] >= 0.99
    blurred = [score(np.stack([cv2.GaussianBlur(f, (0, 0), s) for f in base]))["world_quality"] for s in (1.5, 2.5, 4.0)]
    assert clean["world_quality"] > blurred[0] > blurred[1] > blurred[2]
    fragments = base.copy()
    fragments[:, 5:9, 50:54] = PALETTE["red"]  # a stray blob in every frame
    fragments[:, 54:57, 10:14] = PALETTE["blue"]
    assert score(fragments)["world_quality"] < clean["world_quality"] - 0.1
    jumpy = base.copy()
    jumpy[8:] = np.roll(base[8:], 12, axis=1)  # the object jumps 12 px down mid-clip
    assert score(jumpy)["world_motion"] < clean["world_motion"] - 0.1
    flicker = base.copy()
    flicker[1::2] = np.asarray(PALETTE["white"], np.float32)  # the object vanishes every other frame
    assert score(flicker)["world_motion"] < 0.6
    noise = np.random.default_rng(0).random(base.shape).astype(np.float32)
    assert score(noise)["world_quality"] < 0.1 and score(noise)["world_motion"] < 0.1


def test_scene_prompt_rewards_judge_each_scene(rewards) -> None:
    text = "a red circle moving left slowly on a blue background[1s] | a blue square moving up slowly on a white background"
    video = hwc(render_scene_prompt(text, np.random.default_rng(4), num_frames=32).frames)[None]
    out = score_all(rewards, video, [text])
    assert all(float(out[name].scores[0]) >= 0.99 for name in WORLD_REWARDS)
    swapped = "a blue square moving up slowly on a white background[1s] | a red circle moving left slowly on a blue background"
    assert float(rewards[0](video, [swapped]).scores[0]) < 0.3


# --------------------------------------------------------------------------------------------------
# Dataset and preview
# --------------------------------------------------------------------------------------------------


def test_training_pairs_are_train_captions_by_seed() -> None:
    config = WorldConfig(num_frames=9)
    caption, frames = training_pair(0, 5, config)
    again_caption, again = training_pair(0, 5, config)
    assert caption == again_caption and torch.equal(frames, again) and frames.shape == (9, 3, 64, 64)
    stream = list(training_pairs(0, config, start=3, stop=8))
    assert len(stream) == 5 and stream[2][0] == caption and torch.equal(stream[2][1], frames)
    train_texts = {c.text for c in train_captions()}
    captions, batch = training_batch(1, range(24), config)
    assert batch.shape == (24, 9, 3, 64, 64) and set(captions) <= train_texts and len(set(captions)) > 15
    assert training_pair(1, 0, config)[0] == captions[0]
    assert not torch.equal(training_pair(0, 6, config)[1], frames)


def test_contact_sheet(tmp_path) -> None:
    videos = [render_caption(c, np.random.default_rng(i)).frames for i, c in enumerate(heldout_captions()[:3])]
    sheet = contact_sheet(videos, [c.text for c in heldout_captions()[:3]], frames_per_row=4)
    strip = max(12, 64 // 4)
    assert sheet.dtype == np.uint8 and sheet.shape == (3 * (strip + 64) + 2 * 2, 4 * 64 + 3 * 2, 3)
    assert np.array_equal(sheet[strip : strip + 64, :64], np.rint(hwc(videos[0])[0] * 255).astype(np.uint8))
    path = save_contact_sheet(tmp_path / "sheet.png", videos, ["a", "b", "c"])
    assert cv2.imread(str(path)).shape == (3 * (strip + 64) + 4, 5 * 64 + 8, 3)
    assert math.isclose(float(sheet[strip + 64 : strip + 66].mean()), 128.0)


def test_rewards_honour_frame_sampling_and_downscaling(ground_truth) -> None:
    captions, videos = ground_truth
    options = {"frame_stride": 2, "max_frames": 6, "max_side": 32}
    sampled = build_rewards([RewardSpec(name=name, options=options) for name in WORLD_REWARDS])
    out = score_all(sampled, videos[:12], [c.text for c in captions[:12]])
    for name in WORLD_REWARDS:
        assert float(out[name].scores.min()) >= 0.95, (name, out[name].scores)
