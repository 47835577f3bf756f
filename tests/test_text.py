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
    pack,
    prompt_ids,
    text_format,
    tokenize,
)

T = 6


def record(answer="A red circle on the left.", prompt="Describe this image.", images=1):
    """One user turn opening with its images' tags (where untagged images go), then the answer."""
    return Record("1", ("a.jpg", "b.jpg", "c.jpg")[:images], (("user", "<image>\n" * images + prompt),
                                                               ("assistant", answer)), "test record 0")


def fmt_for(path, **kw):
    cfg = TokenizerConfig(name_or_path=str(path), **kw)
    return text_format(load_tokenizer(cfg), cfg, T)


@pytest.fixture(params=["demo", "v1", "v3"])
def fmt(request, demo):
    return fmt_for(demo / "tokenizer" if request.param == "demo" else tokenizer_dir(request.param))


def test_image_becomes_T_placeholders_and_loss_is_on_the_answer_only(fmt):
    ids, labels = encode_sample(fmt, record())
    assert ids.count(fmt.image_token_id) == T
    first = ids.index(fmt.image_token_id)
    assert ids[first:first + T] == [fmt.image_token_id] * T
    answer = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert all(lab in (IGNORE, t) for t, lab in zip(ids, labels))
    assert decode(fmt, answer).startswith("A red circle on the left.")
    assert fmt.eos_id in answer  # the model learns to stop
    assert labels[:ids.index(answer[0])] == [IGNORE] * ids.index(answer[0])


def test_generation_prompt_is_the_training_prefix(fmt):
    ids, labels = encode_sample(fmt, record())
    start = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert prompt_ids(fmt, "Describe this image.") == ids[:start]


def test_text_only_record_has_no_placeholders(fmt):
    ids, labels = encode_sample(fmt, record(images=0))
    assert fmt.image_token_id not in ids and any(lab != IGNORE for lab in labels)


def test_v1_gets_an_image_token_added_and_pads_with_eos():
    f = fmt_for(tokenizer_dir("v1"))
    assert f.vocab_size == 6401 and f.image_token_id == 6400 and f.pad_id == f.eos_id
    assert f.chat


def test_v3_uses_its_own_image_pad_token_and_think_block():
    f = fmt_for(tokenizer_dir("v3"))
    assert f.image_token_id == 12 and f.vocab_size == 6400 and f.pad_id == 0
    ids, labels = encode_sample(f, record())
    start = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert "<think>" in f.tokenizer.decode(ids[:start]) and "<think>" not in f.tokenizer.decode(ids[start:])


def test_plain_template_is_image_then_caption_then_eos(demo):
    f = fmt_for(demo / "tokenizer", template="plain")
    ids, labels = encode_sample(f, record())
    assert ids[:T] == [f.image_token_id] * T and ids[-1] == f.eos_id
    assert labels[:T] == [IGNORE] * T and labels[T:] == ids[T:]


def test_truncation_cuts_the_answer_never_the_image(fmt):
    long = " ".join(["red circle"] * 200)
    cfg_len = 40
    f = fmt_for(fmt.tokenizer.name_or_path, max_len=cfg_len)
    ids, labels = encode_sample(f, record(answer=long))
    assert len(ids) == cfg_len and ids.count(f.image_token_id) == T
    with pytest.raises(ValueError, match="test record 0: its images and prompt do not fit tokenizer.max_len=15"):
        encode_sample(fmt_for(fmt.tokenizer.name_or_path, max_len=T + 9), record(prompt="word " * 50))


def test_each_image_goes_where_its_tag_stands_in_any_turn(fmt):
    """Two images, the second in the second user turn, after the first answer: its T placeholders sit where the
    rendered conversation has the image token, and nothing else moves."""
    turns = (("user", "Look <image> closely."), ("assistant", "A red circle."), ("user", "And <image>?"),
             ("assistant", "A blue square."))
    ids, labels = encode_sample(fmt, Record("2", ("a.jpg", "b.jpg"), turns, "test record 2"))
    runs = [i for i, t in enumerate(ids) if t == fmt.image_token_id and (i == 0 or ids[i - 1] != t)]
    assert len(runs) == 2 and ids.count(fmt.image_token_id) == 2 * T
    msgs = [{"role": r, "content": t.replace("<image>", fmt.image_token)} for r, t in turns]
    rendered = fmt.tokenizer(fmt.tokenizer.apply_chat_template(msgs, tokenize=False),  # the reference: the template
                             add_special_tokens=False)["input_ids"]
    expanded = [x for t in rendered for x in ([t] * T if t == fmt.image_token_id else [t])]
    assert ids == expanded[:len(ids)]
    answers = fmt.tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    first_answer = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert "A red circle." in answers and "A blue square." in answers and runs[0] < first_answer < runs[1]


def test_a_sample_whose_images_do_not_fit_is_left_out_never_cut_into(fmt):
    """An image after a long first answer: cutting the tail would cut into it, so the sample is left out (and
    counted by the caller); with room for it, the tail after it is cut instead."""
    turns = (("user", "<image>\nDescribe."), ("assistant", "word " * 60), ("user", "And <image>?"),
             ("assistant", "word " * 60))
    rec = Record("3", ("a.jpg", "b.jpg"), turns, "test record 3")
    full = len(encode_sample(fmt_for(fmt.tokenizer.name_or_path, max_len=10_000), rec)[0])
    second = [i for i, t in enumerate(encode_sample(fmt_for(fmt.tokenizer.name_or_path, max_len=10_000), rec)[0])
              if t == fmt.image_token_id][-1]
    tight = fmt_for(fmt.tokenizer.name_or_path, max_len=second)  # one position short of the second image's end
    tokens, fits = tokenize(tight, [record(), rec, record(images=0)])
    assert fits.tolist() == [True, False, True] and len(tokens) == 2 and tokens.placeholders.tolist() == [1, 0]
    roomy = fmt_for(fmt.tokenizer.name_or_path, max_len=second + 5)
    ids, _ = encode_sample(roomy, rec)
    assert len(ids) == second + 5 < full and ids.count(roomy.image_token_id) == 2 * T


def test_the_image_token_written_in_a_record_is_an_error_naming_it(fmt):
    rec = Record("4", ("a.jpg",), (("user", "<image>\nWhat is " + fmt.image_token + "?"), ("assistant", "x")), "f.json record 4")
    with pytest.raises(ValueError, match="f.json record 4: 2 image token"):
        tokenize(fmt, [rec])


RECS = [dict(), dict(answer="Two blue squares, one above the other.", images=0), dict(prompt="What is it?", images=2)]


def test_batch_is_each_sample_padded_and_expanded_as_alone(fmt):
    recs = [record(**kw) for kw in RECS]
    tokens, _ = tokenize(fmt, recs)
    (ids, labels), = collate(fmt, tokens, np.array([2, 0, 1]), [1, 1, 1], [3])  # (3, L)
    for b, i in enumerate([2, 0, 1]):
        one_ids, one_labels = encode_sample(fmt, recs[i])
        n = len(one_ids)
        assert ids[b, :n].tolist() == one_ids and labels[b, :n].tolist() == one_labels
        assert (ids[b, n:] == fmt.pad_id).all() and (labels[b, n:] == IGNORE).all()
    assert ids.shape[1] == max(len(encode_sample(fmt, r)[0]) for r in recs)


def test_packed_rows_hold_each_sample_as_alone_with_positions_from_zero(fmt):
    """Batch 1: samples 2 and 0 share a row, 1 has its own; batch 2: sample 1 alone. Each sample's tokens and labels
    are its tokens alone, its positions count from 0, and a row's padding is one more run from 0."""
    recs = [record(**kw) for kw in RECS]
    tokens, _ = tokenize(fmt, recs)
    alone = [encode_sample(fmt, r) for r in recs]
    (ids, labels, pos), (ids2, _, pos2) = collate(fmt, tokens, np.array([2, 0, 1, 1]), [2, 1, 1], [2, 1], packed=True)
    n2, n0, n1 = (len(alone[i][0]) for i in (2, 0, 1))
    assert ids.shape == (2, max(n2 + n0, n1)) and ids2.shape == (1, n1)
    for row, at, i in ((0, 0, 2), (0, n2, 0), (1, 0, 1)):
        n = len(alone[i][0])
        assert ids[row, at:at + n].tolist() == alone[i][0] and labels[row, at:at + n].tolist() == alone[i][1]
        assert pos[row, at:at + n].tolist() == list(range(n))
    for row, used in ((0, n2 + n0), (1, n1)):
        assert (ids[row, used:] == fmt.pad_id).all() and (labels[row, used:] == IGNORE).all()
        assert pos[row, used:].tolist() == list(range(ids.shape[1] - used))
    assert pos2[0].tolist() == list(range(n1))


def test_pack_fills_rows_longest_first_within_capacity():
    lengths = np.array([5, 9, 3, 7, 2])
    rows = pack(lengths, 10)
    assert rows == [[1], [3, 2], [0, 4]] and pack(lengths, 10) == rows
    assert all(lengths[r].sum() <= 10 for r in rows) and sorted(sum(rows, [])) == list(range(5))
    assert pack(np.array([12, 3]), 10) == [[0], [1]]  # too long for any row: a row of its own


@pytest.mark.parametrize("which", ["demo", "v1", "v3"])
def test_split_markers_are_one_special_token_each_after_the_tokenizers_own(which, demo):
    from minivlm.training.layout import markers

    path = demo / "tokenizer" if which == "demo" else tokenizer_dir(which)
    cfg = TokenizerConfig(name_or_path=str(path))
    plain, tok = load_tokenizer(cfg), load_tokenizer(cfg, markers("split", 3))
    names = markers("split", 3)
    assert len(names) == 2 + 9 and len(tok) == len(plain) + len(names)  # the placeholder kept its id
    assert tok.convert_tokens_to_ids(cfg.image_token) == plain.convert_tokens_to_ids(cfg.image_token)
    ids = tok("".join(names), add_special_tokens=False)["input_ids"]
    assert ids == list(range(len(plain), len(tok)))  # appended in order: the LM's own rows stay its rows
    assert tok.decode(tok("a<row_2_col_3>b")["input_ids"], skip_special_tokens=True).replace(" ", "") == "ab"
