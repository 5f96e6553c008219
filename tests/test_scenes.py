import pytest

from astrolabe.sampling.scenes import Scene, ScenePromptError, parse_scene_prompt, plan_scenes


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
    segs = plan_scenes(parse_scene_prompt("a | b | c"), num_blocks=7, fps=16, block_frames=3)
    assert [(s.start_block, s.end_block) for s in segs] == [(0, 3), (3, 5), (5, 7)]
    # the last scene's duration is honoured when all scenes have one and the video is longer
    segs = plan_scenes(parse_scene_prompt("a[3s] | b[3s]"), num_blocks=8, fps=16, block_frames=3)
    assert segs[1].end_block == 8
    with pytest.raises(ValueError, match="lengthen"):
        plan_scenes(parse_scene_prompt("a[30s] | b"), num_blocks=8, fps=16, block_frames=3)
