"""minivlm.checkpoint on a tiny module: what a checkpoint holds comes back, half-written ones are invisible,
the newest `keep` are kept."""
import pytest
import torch

from minivlm import checkpoint


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
