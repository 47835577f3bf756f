"""minivlm.use.generate on a tiny random model: sampling keeps what top-k / top-p allow, rows stop at eos."""
import torch

from minivlm.config import ModelConfig
from minivlm.training.model import VLM
from minivlm.use.generate import generate, sample_next


def test_top_p_samples_only_the_smallest_prefix_reaching_p_and_top_k_only_the_k_best():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(400, 1)  # probabilities 0.5, 0.3, 0.15, 0.05
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_k=3, generator=g).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3}
    assert sample_next(logits, 0.0).tolist() == [0] * 400


def test_each_row_stops_after_its_first_eos():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layer=2, n_head=2, n_kv_head=1, multiple_of=16, max_seq_len=32)
    model = VLM(cfg, 40, 8, 39).eval()
    ids = torch.randint(0, 39, (3, 5))
    free = generate(model, ids, None, 8, eos_id=None)
    eos = free[0][2]
    cut = generate(model, ids, None, 8, eos_id=eos)
    for row, full in zip(cut, free):
        assert row == (full[:full.index(eos) + 1] if eos in full else full)


def test_on_token_sees_every_step_as_it_comes_and_changes_nothing():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layer=2, n_head=2, n_kv_head=1, multiple_of=16, max_seq_len=32)
    model = VLM(cfg, 40, 8, 39).eval()
    ids = torch.randint(0, 39, (3, 5))
    steps = []
    streamed = generate(model, ids, None, 8, eos_id=None, on_token=steps.append)
    assert streamed == generate(model, ids, None, 8, eos_id=None)
    assert [list(row) for row in zip(*steps)] == streamed  # step by step, (B,) each
