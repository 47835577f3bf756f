import dataclasses
import runpy
import sys

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


# An out-of-range value for every numeric field of every section, written here rather than read from the code:
# a new numeric field without an entry fails the walk below.
OUT_OF_RANGE = {
    "data": {"val_frac": [1.5, 1.0, -0.1, "nan"], "max_images": [0], "max_dropped_frac": [1.5, -0.1]},
    "encoder": {"pool": [0], "max_tiles": [0], "batch_size": [0], "num_workers": [-1], "max_image_pixels": [0]},
    "cache": {"shard_size": [0], "max_failure_frac": [-0.1, 1.5]},
    "tokenizer": {"max_len": [0]},
    "model": {"dim": [0], "n_layer": [0], "n_head": [0], "n_kv_head": [0], "head_dim": [-2], "ffn_dim": [-1],
              "multiple_of": [0], "norm_eps": [0, -1e-5], "rope_theta": [0, "inf"], "max_seq_len": [0],
              "dropout": [-0.1, 1.0], "n_routed_experts": [0], "n_experts_per_tok": [0], "n_shared_experts": [-1],
              "aux_loss_alpha": [-0.1], "pool": [0], "pixel_shuffle": [0, -2]},
    "train": {"seed": [-1, 2 ** 32], "epochs": [0], "max_steps": [-5], "batch_size": [0], "grad_accum": [0],
              "lr": [-1, "nan"], "min_lr": [-1e-5], "warmup_steps": [-1], "weight_decay": [-0.1], "beta1": [1.0, -0.1],
              "beta2": [1.5], "grad_clip": [-1], "freeze_llm": [3, -1], "num_workers": [-1], "eval_interval": [-1],
              "eval_batches": [-1, 0], "save_interval": [-1], "keep_checkpoints": [-1], "log_interval": [0]},
}
CHECKED_WHEN_LOADED = {"encoder.select_layer": "test_encoder (the encoder's depth)"}


def test_every_numeric_setting_out_of_range_is_one_line_naming_it_at_load():
    from minivlm.config import SECTIONS, _field_types
    numeric = {f"{name}.{key}" for name, cls in SECTIONS.items() for key, typ in _field_types(cls).items()
               if typ in (int, float)}
    assert numeric == {f"{s}.{k}" for s, keys in OUT_OF_RANGE.items() for k in keys} | set(CHECKED_WHEN_LOADED)
    for section, keys in OUT_OF_RANGE.items():
        for key, values in keys.items():
            for value in values:
                with pytest.raises(ValueError) as e:
                    load_config(None, [f"{section}.{key}={value}"])
                assert str(e.value).startswith(f"{section}.{key} must be ") and "\n" not in str(e.value), e.value


def run_script(script: str, *args: str, monkeypatch, capsys) -> tuple[int, str]:
    """A stage script run as `python stages/<script> args` would, in this process: (exit code, stderr)."""
    from conftest import REPO
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [f"stages/{script}", *args])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(f"stages/{script}", run_name="__main__")
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("script, args, named", [
    ("caption.py", ["--max_new_tokens", "-1"], "--max_new_tokens must be >= 1, got -1"),
    ("caption.py", ["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    ("caption.py", ["--top_k", "-1"], "--top_k must be >= 0, got -1"),
    ("caption.py", ["--top_p", "2"], "--top_p must be in (0, 1], got 2.0"),
    ("caption.py", ["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    ("caption.py", ["--seed", "-1"], "--seed must be in [0, 4294967296), got -1"),
    ("evaluate.py", ["--n", "0"], "--n must be >= 1, got 0"),
    ("sweep.py", ["--parallel", "0"], "--parallel must be >= 1, got 0"),
    ("sweep.py", ["--nproc_per_node", "0"], "--nproc_per_node must be >= 1, got 0"),
    ("demo_data.py", ["--n_train", "0"], "--n_train must be >= 1, got 0"),
    ("demo_data.py", ["--n_val", "-1"], "--n_val must be >= 0, got -1"),
    ("demo_data.py", ["--seed", "-1"], "--seed must be in [0, 4294967296), got -1"),
    ("train.py", ["train.log_interval=0"], "train.log_interval must be >= 1, got 0"),
    ("train.py", ["train.max_steps=-5"], "train.max_steps must be >= 0, got -5"),
    ("embed.py", ["data.val_frac=1.5"], "data.val_frac must be in [0, 1), got 1.5"),
    ("sweep.py", ["model.n_layer=0"], "model.n_layer must be >= 1, got 0"),
])
def test_every_stage_option_out_of_range_exits_2_with_one_line_before_any_work(script, args, named, tmp_path,
                                                                                  monkeypatch, capsys):
    (tmp_path / "s.toml").write_text('[grid]\n"train.lr" = [1e-3]\n')
    required = {"caption.py": ["--run", str(tmp_path / "no-run"), "--image", "x.jpg"],
                "evaluate.py": ["--run", str(tmp_path / "no-run")], "sweep.py": ["--sweep", str(tmp_path / "s.toml")],
                "demo_data.py": ["--out", str(tmp_path / "demo")]}.get(script, [])
    code, err = run_script(script, *required, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert (code, err) == (2, f"error: {named}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]  # nothing was written or created
