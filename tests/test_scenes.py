import pytest

from astrolabe.sampling.scenes import (
    DEFAULT_SCENE_BLOCKS,
    Scene,
    ScenePlanError,
    ScenePromptError,
    SceneSegment,
    blocks_for_seconds,
    parse_scene_prompt,
    plan_scenes,
    required_blocks,
)


def test_plain_prompt_and_hash_in_text():
    assert parse_scene_prompt("a cat #1 on a mat") == [Scene("a cat #1 on a mat")]


def test_all_forms():
    assert parse_scene_prompt("a | b") == [Scene("a"), Scene("b")]
    assert parse_scene_prompt("a[5s] | b[15s]") == [Scene("a", 5.0), Scene("b", 15.0)]
    assert parse_scene_prompt("a [10s#] | b") == [Scene("a", 10.0, True), Scene("b")]
    assert parse_scene_prompt("a[#]|b") == [Scene("a", None, True), Scene("b")]


@pytest.mark.parametrize(
    "text,pos,msg",
    [
        ("a[5s | b", 1, "unclosed"),
        ("a | ", 3, "empty scene"),
        ("a[5x] | b", 2, "expected a duration"),
        ("a] | b", 1, "without"),
        ("a | b[3s#]", 6, "last scene"),
        ("a[5s] x | b", 5, "after the duration"),
    ],
)
def test_malformed_points_at_character(text, pos, msg):
    with pytest.raises(ScenePromptError, match=msg) as e:
        parse_scene_prompt(text)
    assert e.value.pos == pos
    assert "^" in str(e.value)


def test_durations_map_to_blocks():
    # 16 fps, stride 4: 3 s -> 12 latent frames -> 4 blocks of 3
    segs = plan_scenes(parse_scene_prompt("a[3s#] | b"), num_blocks=10, fps=16, block_frames=3)
    assert [(s.start_block, s.end_block, s.hard_cut_before) for s in segs] == [(0, 4, False), (4, 10, True)]
    # the release floors: 5 s -> 80/12 = 6.67 -> 6 blocks; at least one block
    assert blocks_for_seconds(5, 16, 3) == 6 and blocks_for_seconds(0.1, 16, 3) == 1
    # a scene without duration lasts the release's 14 blocks (= 10.5 s); the last one runs to the end
    assert DEFAULT_SCENE_BLOCKS == 14 == blocks_for_seconds(10.5, 16, 3)
    segs = plan_scenes(parse_scene_prompt("a | b | c"), num_blocks=30, fps=16, block_frames=3)
    assert [(s.start_block, s.end_block) for s in segs] == [(0, 14), (14, 28), (28, 30)]
    assert required_blocks(parse_scene_prompt("a | b | c"), 16, 3) == 29
    assert required_blocks(parse_scene_prompt("a plain prompt"), 16, 3) == 1
    # the last scene's duration is honoured when all scenes have one and the video is longer
    segs = plan_scenes(parse_scene_prompt("a[3s] | b[3s]"), num_blocks=8, fps=16, block_frames=3)
    assert segs[1].end_block == 8
    with pytest.raises(ScenePlanError, match="lengthen") as e:
        plan_scenes(parse_scene_prompt("a[30s] | b"), num_blocks=8, fps=16, block_frames=3)
    assert e.value.blocks_needed == 41  # 40 + 1 block for the open-ended last scene
    assert "--num-frames 489" in str(e.value)  # 41 blocks = 123 latent frames = 1 + 4 * 122 pixel frames


def test_benchmark_six_scene_line_gets_the_release_block_plan():
    """A line shaped like the release's interactive_benchmark.txt: six scenes of ``[10s]``. The release gives
    each int(10 * 16 / 12) = 13 blocks; at --num_frames 960 (240 latent frames, 80 blocks) the boundaries are
    the cumulative counts and the last scene runs to the end."""
    line = " | ".join(f"scene {i} of a wizard and a small dragon in a stone chamber [10s]" for i in range(6))
    scenes = parse_scene_prompt(line)
    assert [s.seconds for s in scenes] == [10.0] * 6 and not any(s.hard_cut_after for s in scenes)
    assert required_blocks(scenes, 16, 3) == 78
    segs = plan_scenes(scenes, num_blocks=80, fps=16, block_frames=3)
    assert [(s.start_block, s.end_block) for s in segs] == [(0, 13), (13, 26), (26, 39), (39, 52), (52, 65), (65, 80)]
    assert segs[0].prompt == "scene 0 of a wizard and a small dragon in a stone chamber"
    with pytest.raises(ScenePlanError, match="--num-frames 933"):  # the release's 81 frames show one scene
        plan_scenes(scenes, num_blocks=7, fps=16, block_frames=3)


def test_window_plan_helpers_on_a_hand_worked_plan():
    """Plan of 10 blocks: 'a' [0, 4), 'b' [4, 5) entered by a hard cut, 'c' [5, 10) entered softly."""
    from astrolabe.sampling.scenes import replay_forwards, segment_at, single_scene_starts, switches_until

    plan = [SceneSegment("a", 0, 4, False), SceneSegment("b", 4, 5, True), SceneSegment("c", 5, 10, False)]
    assert [segment_at(plan, b).prompt for b in range(10)] == list("aaaabccccc")
    with pytest.raises(ValueError, match="outside"):
        segment_at(plan, 10)
    assert single_scene_starts(plan, 1) == list(range(10))
    assert single_scene_starts(plan, 2) == [0, 1, 2, 5, 6, 7, 8]  # 'b' is too short; no window straddles a switch
    assert single_scene_starts(plan, 6) == []
    assert [s.prompt for s in switches_until(plan, 3)] == []
    assert [s.prompt for s in switches_until(plan, 4)] == ["b"]  # a window starting a scene sees its switch
    assert [s.prompt for s in switches_until(plan, 7)] == ["b", "c"]
    # forwards of the replay: one per prefix block, one re-cache per soft switch (the hard cut flushes, no forward)
    assert [replay_forwards(plan, b) for b in (0, 3, 4, 5, 7)] == [0, 3, 4, 6, 8]
