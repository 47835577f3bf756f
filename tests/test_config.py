import dataclasses

import pytest

from minivlm.config import RunConfig, TrainConfig, load_config, to_toml, to_tree


def test_overrides_are_typed_by_the_dataclass(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "encoder.keep_cls=true", "cache.shard_size=7", "data.records=x.json"])
    assert cfg.train.lr == 3e-4 and cfg.encoder.keep_cls is True and cfg.cache.shard_size == 7
    assert cfg.data.records == "x.json"


def test_unknown_key_lists_the_valid_keys_of_its_section(tmp_path):
    with pytest.raises(ValueError, match="unknown key train.lrr.*valid keys of \\[train\\]:.*\\blr\\b"):
        load_config(None, ["train.lrr=1"])
    p = tmp_path / "c.toml"
    p.write_text("[encoder]\nselect_layr = -2\n")
    with pytest.raises(ValueError, match="c.toml: unknown key encoder.select_layr.*select_layer"):
        load_config(p)


def test_unknown_section_and_wrong_type_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown section"):
        load_config(None, ["trian.lr=1"])
    with pytest.raises(ValueError, match="train.epochs: expected int"):
        load_config(None, ["train.epochs=two"])
    p = tmp_path / "c.toml"
    p.write_text('[train]\nlr = "fast"\n')
    with pytest.raises(ValueError, match="train.lr: expected float"):
        load_config(p)


def test_validation_in_post_init():
    with pytest.raises(ValueError, match="freeze_llm"):
        load_config(None, ["train.freeze_llm=3"])
    with pytest.raises(ValueError, match="n_kv_head"):
        load_config(None, ["model.n_head=8", "model.n_kv_head=3", "model.dim=64"])


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, ["train.lr=0.001", "model.projector=linear", "data.records=a \"b\".json"])
    p = tmp_path / "resolved.toml"
    p.write_text(to_toml(to_tree(cfg)))
    assert load_config(p) == cfg


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().lr = 1.0
    assert RunConfig().train.run_dir.name == "demo"


def test_every_shipped_config_loads():
    from pathlib import Path
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert {p.name for p in configs} >= {"demo.toml", "llava_pretrain.toml", "minimind_v1.toml"}
    for p in configs:
        load_config(p)
