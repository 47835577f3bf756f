"""Prompt format, placeholders and loss masks, for the demo tokenizer and both real MiniMind tokenizers."""
import numpy as np
import pytest

from conftest import tokenizer_dir
from minivlm.config import TokenizerConfig
from minivlm.formats.records import Record
from minivlm.training.text import (
    IGNORE,
    collate,
    decode,
    encode_sample,
    load_tokenizer,
    prompt_ids,
    text_format,
    tokenize,
)

T = 6


def record(answer="A red circle on the left.", prompt="Describe this image."):
    return Record("1", "a.jpg", (("user", prompt), ("assistant", answer)), "test record 0")


def fmt_for(path, **kw):
    cfg = TokenizerConfig(name_or_path=str(path), **kw)
    return text_format(load_tokenizer(cfg), cfg, T)


@pytest.fixture(params=["demo", "v1", "v3"])
def fmt(request, demo):
    return fmt_for(demo / "tokenizer" if request.param == "demo" else tokenizer_dir(request.param))


def test_image_becomes_T_placeholders_and_loss_is_on_the_answer_only(fmt):
    ids, labels = encode_sample(fmt, record(), with_image=True)
    assert ids.count(fmt.image_token_id) == T
    first = ids.index(fmt.image_token_id)
    assert ids[first:first + T] == [fmt.image_token_id] * T
    answer = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert all(lab in (IGNORE, t) for t, lab in zip(ids, labels))
    assert decode(fmt, answer).startswith("A red circle on the left.")
    assert fmt.eos_id in answer  # the model learns to stop
    assert labels[:ids.index(answer[0])] == [IGNORE] * ids.index(answer[0])


def test_generation_prompt_is_the_training_prefix(fmt):
    ids, labels = encode_sample(fmt, record(), with_image=True)
    start = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert prompt_ids(fmt, "Describe this image.") == ids[:start]


def test_text_only_record_has_no_placeholders(fmt):
    ids, labels = encode_sample(fmt, record(), with_image=False)
    assert fmt.image_token_id not in ids and any(lab != IGNORE for lab in labels)


def test_v1_gets_an_image_token_added_and_pads_with_eos():
    f = fmt_for(tokenizer_dir("v1"))
    assert f.vocab_size == 6401 and f.image_token_id == 6400 and f.pad_id == f.eos_id
    assert f.chat


def test_v3_uses_its_own_image_pad_token_and_think_block():
    f = fmt_for(tokenizer_dir("v3"))
    assert f.image_token_id == 12 and f.vocab_size == 6400 and f.pad_id == 0
    ids, labels = encode_sample(f, record(), with_image=True)
    start = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert "<think>" in f.tokenizer.decode(ids[:start]) and "<think>" not in f.tokenizer.decode(ids[start:])


def test_plain_template_is_image_then_caption_then_eos(demo):
    f = fmt_for(demo / "tokenizer", template="plain")
    ids, labels = encode_sample(f, record(), with_image=True)
    assert ids[:T] == [f.image_token_id] * T and ids[-1] == f.eos_id
    assert labels[:T] == [IGNORE] * T and labels[T:] == ids[T:]


def test_truncation_cuts_the_answer_never_the_image(fmt):
    long = " ".join(["red circle"] * 200)
    cfg_len = 40
    f = fmt_for(fmt.tokenizer.name_or_path, max_len=cfg_len)
    ids, labels = encode_sample(f, record(answer=long), with_image=True)
    assert len(ids) == cfg_len and ids.count(f.image_token_id) == T
    with pytest.raises(ValueError, match="test record 0: prompt longer than tokenizer.max_len=15"):
        encode_sample(fmt_for(fmt.tokenizer.name_or_path, max_len=T + 9), record(prompt="word " * 50), True)


def test_batch_is_each_sample_padded_and_expanded_as_alone(fmt):
    recs = [record(), record(answer="Two blue squares, one above the other."), record(prompt="What is it?")]
    has = [True, False, True]
    (ids, labels), = collate(fmt, tokenize(fmt, recs, has), np.array([2, 0, 1]), [3])  # (3, L)
    for b, i in enumerate([2, 0, 1]):
        one_ids, one_labels = encode_sample(fmt, recs[i], has[i])
        n = len(one_ids)
        assert ids[b, :n].tolist() == one_ids and labels[b, :n].tolist() == one_labels
        assert (ids[b, n:] == fmt.pad_id).all() and (labels[b, n:] == IGNORE).all()
    assert ids.shape[1] == max(len(encode_sample(fmt, r, h)[0]) for r, h in zip(recs, has))
