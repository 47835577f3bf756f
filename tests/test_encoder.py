"""minivlm.encoder.EncoderSpec: the one comparison of encoder specs that every stage makes."""
from dataclasses import replace

import pytest

from minivlm.config import EncoderConfig
from minivlm.encoder import EncoderSpec

LOADED = {"arch": "CLIPVisionModel", "weights": "w1", "processor": "p1"}


def spec(path="enc", **config) -> EncoderSpec:
    return EncoderSpec.of_config(EncoderConfig(name_or_path=path, **config))


def test_configs_differ_by_selection_or_path_and_loaded_encoders_by_fingerprint_not_path():
    assert spec().differs(spec(keep_cls=True)) == ["keep_cls"]
    assert spec().differs(spec("other")) == ["name_or_path"]  # not loaded: the path names the weights
    a = replace(spec(), fingerprint={**spec().fingerprint, **LOADED})
    moved = replace(a, name_or_path="moved/enc")
    assert a.differs(moved) == []  # loaded: the weights hash decides, a moved directory still matches
    assert a.differs(replace(moved, fingerprint={**a.fingerprint, "weights": "w2"})) == ["weights"]
    assert spec("other").differs(a) == []  # a config against a cache: the fields the config knows
    assert a.differs(replace(a, fingerprint={**a.fingerprint, "new_field": 1})) == ["fingerprint"]


def test_check_names_every_differing_field_with_both_values_and_the_fix():
    with pytest.raises(ValueError, match=r"^the config has encoder.select_layer=-1, encoder.pool=2 where cache c "
                                         r"has encoder.select_layer=-2, encoder.pool=1; re-embed$"):
        spec().check(spec(select_layer=-1, pool=2), "the config", "cache c", "re-embed")
    spec().check(spec(batch_size=7, num_workers=0), "the config", "cache c", "re-embed")  # not part of the spec


def test_manifest_entry_round_trips():
    a = replace(spec(), compute_dtype="float32", fingerprint={**spec().fingerprint, **LOADED})
    assert EncoderSpec.of_manifest({"encoder": a.as_json(), "fingerprint_fields": a.fingerprint}) == a
