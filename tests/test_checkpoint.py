"""minivlm.training.checkpoint on a tiny module: what a checkpoint holds comes back, half-written ones are invisible,
the newest `keep` are kept; a resume keeps the global batch, and reads the cursor of an earlier minivlm."""
import json

import pytest
import torch

from minivlm.config import load_config, to_toml, to_tree
from minivlm.dist import Dist
from minivlm.training import checkpoint
from minivlm.training.checkpoint import Checkpoints


def tiny():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt


def test_a_checkpoint_restores_weights_optimizer_and_state_and_the_newest_are_kept(tmp_path):
    model, opt = tiny()
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(tmp_path, model, {"optimizer": opt.state_dict(), "rng": [torch.get_rng_state()]},
                                   {"step": step, "epoch": 0, "batch": step}, keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]
    other = torch.nn.Linear(3, 2)
    train_state, state = checkpoint.load_checkpoint(checkpoint.checkpoints(tmp_path)[-1], other)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert state == {"step": 3, "epoch": 0, "batch": 3}
    assert torch.equal(train_state["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_a_half_written_checkpoint_is_never_listed_and_is_removed(tmp_path):
    model, opt = tiny()
    checkpoint.save_checkpoint(tmp_path, model, {}, {"step": 1}, keep=2)
    (tmp_path / checkpoint.CKPT_DIR / "step-0000002.tmp").mkdir()
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-0000001"]
    checkpoint.remove_stale(tmp_path)
    assert sorted(p.name for p in (tmp_path / checkpoint.CKPT_DIR).iterdir()) == ["step-0000001"]


def fake_checkpoint(run_dir, **state):
    d = run_dir / checkpoint.CKPT_DIR / f"step-{state['step']:07d}"
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps(state))


def test_resuming_with_another_global_batch_is_refused_naming_the_three_numbers_and_a_setting_that_keeps_it(tmp_path):
    cfg = load_config(None, [f"train.out_dir={tmp_path}", "train.batch_size=4"])
    fake_checkpoint(cfg.train.run_dir, step=40, epoch=0, sample=320, batch_size=4, grad_accum=1, world_size=2,
                    global_batch=8)
    Checkpoints(load_config(None, [f"train.out_dir={tmp_path}", "train.batch_size=4", "train.grad_accum=2"]), Dist())
    Checkpoints(load_config(None, [f"train.out_dir={tmp_path}", "train.batch_size=8"]), Dist())
    for over, keep in ((["train.batch_size=4"], "set train.grad_accum=2 to keep 8"),
                       (["train.batch_size=3"], "set train.batch_size=8 to keep 8"),
                       (["train.batch_size=3", "train.grad_accum=3"], "run on 2 rank(s) as it was")):
        with pytest.raises(ValueError) as e:
            Checkpoints(load_config(None, [f"train.out_dir={tmp_path}", *over]), Dist())
        assert "\n" not in str(e.value) and str(e.value).startswith(
            f"{cfg.train.run_dir}/checkpoints/step-0000040 was trained with a global batch of 8 (train.batch_size=4 x "
            f"train.grad_accum=1 x 2 rank(s)), this run's is ") and keep in str(e.value), e.value


def test_a_checkpoint_with_the_earlier_per_rank_batch_cursor_resumes_at_the_same_sample(tmp_path):
    """Before the global cursor, state.json held `batch`: the micro-batches each rank had read of order[r::world]."""
    cfg = load_config(None, [f"train.out_dir={tmp_path}", "train.batch_size=4", "train.grad_accum=3"])
    cfg.train.run_dir.mkdir(parents=True)
    (cfg.train.run_dir / "config.toml").write_text(to_toml(to_tree(cfg)))
    fake_checkpoint(cfg.train.run_dir, step=5, epoch=1, batch=15, world_size=2, image_tokens=16, image_width=64)
    saved = Checkpoints(load_config(None, [f"train.out_dir={tmp_path}", "train.batch_size=4", "train.grad_accum=6"]),
                        Dist()).saved  # 1 rank now, the same global batch of 24
    assert (saved["sample"], saved["global_batch"], saved["epoch"]) == (15 * 4 * 2, 24, 1)
