import json

import pytest

from minivlm.formats.records import image_keys, load_records, normalize_key, resolve_image


def _rec(i, image="a.jpg"):
    r = {"id": str(i), "conversations": [{"from": "human", "value": "<image>\nDescribe." if image else "Hi."},
                                         {"from": "gpt", "value": "A cat."}]}
    if image:
        r["image"] = image
    return r


def test_json_array_and_jsonl_give_the_same_records(tmp_path):
    recs = [_rec(0, "x/./a.jpg"), _rec(1, "b.jpg"), _rec(2, None)]
    (tmp_path / "r.json").write_text(json.dumps(recs))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    a, b = load_records(tmp_path / "r.json"), load_records(tmp_path / "r.jsonl")
    assert [(r.id, r.images, r.turns) for r in a] == [(r.id, r.images, r.turns) for r in b]
    assert a[0].images == ("x/a.jpg",) and a[2].images == ()
    assert a[0].turns == (("user", "<image>\nDescribe."), ("assistant", "A cat."))


def test_the_kth_tag_is_the_kth_image_in_any_turn_and_untagged_images_open_the_first_user_turn(tmp_path):
    parts = [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "with"},
             {"type": "image"}]
    recs = [{"id": "tags", "image": ["a.jpg", "b.jpg"], "conversations": [
                {"from": "human", "value": "Look: <image>"}, {"from": "gpt", "value": "A."},
                {"from": "human", "value": "And <image> here?"}, {"from": "gpt", "value": "B."}]},
            {"id": "parts", "images": ["a.jpg", "c.jpg"], "messages": [{"role": "user", "content": parts},
                                                                         {"role": "assistant", "content": "Two."}]},
            {"id": "untagged", "image": ["b.jpg", "a.jpg"], "conversations": [
                {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Both?"},
                {"from": "gpt", "value": "Yes."}]},
            {"id": "no user turn", "image": "a.jpg", "conversations": [{"from": "gpt", "value": "A."}]}]
    (tmp_path / "r.json").write_text(json.dumps(recs))
    tags, parts, untagged, lone = load_records(tmp_path / "r.json")
    assert tags.images == ("a.jpg", "b.jpg") and tags.turns[0][1] == "Look: <image>" and tags.turns[2][1] == \
        "And <image> here?"
    assert parts.images == ("a.jpg", "c.jpg") and parts.turns[0] == ("user", "Compare<image>\nwith<image>")
    assert untagged.turns == (("system", "Be brief."), ("user", "<image>\n<image>\nBoth?"), ("assistant", "Yes."))
    assert lone.turns == (("user", "<image>\n"), ("assistant", "A."))


def test_identical_keys_are_planned_once():
    assert normalize_key("./a//b.jpg") == normalize_key("a/b.jpg") == "a/b.jpg"


def test_image_keys_sorted_unique(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps([_rec(0, "b.jpg"), _rec(1, "./a.jpg"), _rec(2, "a.jpg")]))
    assert image_keys(load_records(tmp_path / "r.json")) == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize("content, where, what", [
    ('[{"id": "1", "image": "a.jpg"}]', "record 0 \\(id 1\\)", "conversations"),
    ('[{"id": "1", "image": "a.jpg", "conversations": [{"from": "human", "value": "hi"}]}]', "record 0", "no gpt turn"),
    ('[{"id": "1", "image": 3, "conversations": []}]', "record 0", "'image' must be"),
    ('[{"id": "1", "conversations": [{"from": "robot", "value": "x"}]}]', "record 0", "conversations\\[0\\]"),
    ('[{"id": "1", "conversations": [], }', "", "invalid JSON at line 1"),
    ('[{"id": "1", "image": ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "<image> x"}, '
     '{"from": "gpt", "value": "y"}]}]', "record 0", "1 <image> tag\\(s\\) for 2 image\\(s\\)"),
    ('[{"id": "1", "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}]}]',
     "record 0", "1 <image> tag\\(s\\) for 0 image\\(s\\)"),
    ('[{"id": "1", "image": ["a.jpg", 3], "conversations": []}]', "record 0", "or a list of them"),
])
def test_malformed_json_names_the_record(tmp_path, content, where, what):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=f"bad.json.*{where}.*{what}"):
        load_records(p)


def test_malformed_jsonl_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(_rec(0)) + "\n" + json.dumps(_rec(1)) + "\n{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl line 3: invalid JSON"):
        load_records(p)


def test_missing_records_file_says_what_to_set(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.records"):
        load_records(tmp_path / "nope.json")


def test_paths_outside_the_root_are_rejected_without_reading(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (root / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    assert resolve_image(root, "sub/a.jpg") == (root / "sub" / "a.jpg").resolve()
    for key in ("../secret.jpg", "/etc/passwd", "sub/../../secret.jpg", "link.jpg"):
        assert resolve_image(root, normalize_key(key)) is None, key


def test_an_absolute_path_inside_the_root_is_that_file_and_one_outside_is_still_refused(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    inside = root / "sub" / "a.jpg"
    assert resolve_image(root, normalize_key(str(inside))) == inside.resolve()
    assert resolve_image(root, normalize_key(str(tmp_path / "b.jpg"))) is None


def test_records_that_cannot_become_samples_are_skipped_with_their_reason_and_the_rest_kept(tmp_path):
    """Video records (tag or not), tags and images that differ (`"image": []` with a tag among them); `"image": []`
    without a tag is text-only. Without a `skip` (data.strict) the first is a stop naming it."""
    turns = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": "y"}]  # noqa: E731
    recs = [_rec(0), {"id": "v1", "video": "a.mp4", "conversations": turns("<image>\nWhat?")},
            {"id": "v2", "video": "b.mp4", "conversations": turns("What?")},
            {"id": "m", "image": [], "conversations": turns("<image>\nx")},
            {"id": "t", "image": [], "conversations": turns("Hello")}]
    (tmp_path / "r.json").write_text(json.dumps(recs))
    skips = []
    kept = load_records(tmp_path / "r.json", lambda reason, where: skips.append((reason, where)))
    assert [(r.id, r.images) for r in kept] == [("0", ("a.jpg",)), ("t", ())]
    assert skips == [("video", f"{tmp_path}/r.json record 1 (id v1)"), ("video", f"{tmp_path}/r.json record 2 (id v2)"),
                     ("mismatch", f"{tmp_path}/r.json record 3 (id m)")]
    with pytest.raises(ValueError, match=r"record 1 \(id v1\): video records are not supported"):
        load_records(tmp_path / "r.json")
