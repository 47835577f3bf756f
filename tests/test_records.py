import json

import pytest

from minivlm.formats.records import image_keys, load_records, normalize_key, resolve_image


def _rec(i, image="a.jpg"):
    r = {"id": str(i), "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                         {"from": "gpt", "value": "A cat."}]}
    if image:
        r["image"] = image
    return r


def test_json_array_and_jsonl_give_the_same_records(tmp_path):
    recs = [_rec(0, "x/./a.jpg"), _rec(1, "b.jpg"), _rec(2, None)]
    (tmp_path / "r.json").write_text(json.dumps(recs))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    a, b = load_records(tmp_path / "r.json"), load_records(tmp_path / "r.jsonl")
    assert [(r.id, r.image, r.turns) for r in a] == [(r.id, r.image, r.turns) for r in b]
    assert a[0].image == "x/a.jpg" and a[2].image is None
    assert a[0].turns == (("user", "Describe."), ("assistant", "A cat."))


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
