"""Trainer data: records, completion-only labels, packing, mixture weights, batch order, tokenizer."""

from __future__ import annotations

import json
import random

import pytest
import torch
from slimtune.apps.train.data import DataError, Form, batch_order, pack, read_records, weighted
from slimtune.apps.train.tasks import Example, Match, encode, generate
from slimtune.apps.train.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer()


def test_char_tokenizer_round_trip():
    text = "rev abcd=dcba\nUP 12+3!"
    assert TOKENIZER.decode(TOKENIZER.encode(text)) == text
    assert min(TOKENIZER.encode(text)) >= 4  # ids 0-3: pad, bos, eos, unk


def test_labels_cover_the_completion_and_eos_only():
    ids, labels = encode(Example("rev ab=", "ba"), TOKENIZER)
    assert ids[0] == TOKENIZER.bos_id and ids[-1] == TOKENIZER.eos_id
    assert labels == [-100] * 8 + [*TOKENIZER.encode("ba"), TOKENIZER.eos_id]
    _, text_labels = encode(Example("", "plain text"), TOKENIZER)
    assert text_labels[0] == -100 and -100 not in text_labels[1:]


def test_packing_keeps_examples_whole():
    examples = generate("copy", 20, seed=0)
    packed = pack(examples, TOKENIZER, seq_len=32)
    length = len(encode(examples[0], TOKENIZER)[0])  # every copy example has the same length (11)
    per_row = 32 // length
    assert len(packed) == -(-20 // per_row)
    assert packed.ids.shape == packed.labels.shape == packed.mask.shape == (len(packed), 32)
    row = packed.ids[0, : per_row * length].view(per_row, length)
    assert (row[:, 0] == TOKENIZER.bos_id).all() and (row[:, -1] == TOKENIZER.eos_id).all()
    assert (packed.labels[packed.mask == 0] == -100).all()
    labelled = int((packed.labels != -100).sum())
    assert labelled == sum(len(e.completion) + 1 for e in examples)


def test_long_plain_text_is_cut_and_long_answers_refused():
    packed = pack([Example("", "x" * 70)], TOKENIZER, seq_len=32)
    assert len(packed) == 3 and int(packed.mask.sum()) == 72  # bos + 70 characters + eos
    with pytest.raises(DataError, match="longer than seq_len=32"):
        pack([Example("p" * 40, "a")], TOKENIZER, seq_len=32)


def test_generated_splits_are_disjoint_and_deterministic():
    train, held_out = generate("reverse", 500, seed=3), generate("reverse", 100, seed=3, split="eval")
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    assert generate("reverse", 500, seed=3) == train
    assert all(e.completion == e.prompt[4:-1][::-1] for e in train)


def test_weights_scale_example_counts():
    examples = generate("copy", 256, seed=0)
    rng = random.Random(0)
    assert len(weighted(examples, 0.25, rng)) == 64
    assert len(weighted(examples, 2.5, rng)) == 640
    assert len(weighted(examples, 1 / 256, rng)) == 1
    assert len(weighted(examples[:10], 1 / 256, rng)) == 1  # a source with a weight never vanishes


def test_jsonl_records(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(5)) + "\n"
    )
    examples, answers = read_records(path, n=3)
    assert answers and examples == [Example(f"q{i}", f"a{i}") for i in range(3)]
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    assert read_records(path) == ([Example("", "hello")], False)
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"prompt": "b", "completion": "c"}) + "\n")
    with pytest.raises(DataError, match="mixes records with answers and plain-text"):
        read_records(path)
    path.write_text(json.dumps({"question": "a"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected an object"):
        read_records(path)


def test_load_from_disk_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}] * 3).save_to_disk(str(tmp_path / "ds"))
    assert read_records(tmp_path / "ds") == ([Example("p", "c")] * 3, True)


def test_batch_order_is_epochs_of_shuffles():
    order = batch_order(rows=10, batch_size=4, steps=6, seed=0)
    assert len(order) >= 24
    assert sorted(order[:10].tolist()) == list(range(10)) and sorted(order[10:20].tolist()) == list(range(10))
    assert torch.equal(order, batch_order(rows=10, batch_size=4, steps=6, seed=0))


def test_chat_records_field_mapping_and_chat_wrapping(tmp_path):
    path = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path.write_text(json.dumps({"conversation": turns}) + "\n")
    examples, answers = read_records(path, form=Form((("messages", "conversation"),)))
    assert answers and examples[0].messages == (("user", "hi"), ("assistant", "hello"))
    assert examples[0].answer == "hello"
    path.write_text(json.dumps({"q": "2+2", "a": "4"}) + "\n")
    form = Form((("completion", "a"), ("prompt", "q")), chat=True)
    (example,), _ = read_records(path, form=form)
    assert example.messages == (("user", "2+2"), ("assistant", "4"))
    (plain,), _ = read_records(path, form=Form((("completion", "a"), ("prompt", "q"))))
    assert plain == Example("2+2", "4")
    for bad, match in [
        ([{"role": "user", "content": "hi"}], "last turn .* must be the assistant's"),
        (
            [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}],
            r"\[0\] must be an object with role",
        ),
        ([], "non-empty list"),
    ]:
        path.write_text(json.dumps({"messages": bad}) + "\n")
        with pytest.raises(DataError, match=match):
            read_records(path)


def test_chat_data_with_the_character_tokenizer_is_refused_by_name():
    chat = Example("", "", (("user", "hi"), ("assistant", "hello")))
    with pytest.raises(DataError, match="character tokenizer has no chat template"):
        pack([chat], CharTokenizer(), 64)


def test_answer_matching():
    assert Match()(" 42 ", "42") and not Match()("42.", "42")
    assert Match("contains")("The capital is Paris.", "paris")
    assert Match(pattern=r"answer is (\d+)")("so the answer is 7, yes", "7")
    assert not Match(pattern=r"answer is (\d+)")("no number", "7")
    assert not Match("loss").scores
    word = Match("word")
    assert word("It is Rome, of course.", "rome") and word("Oslo", "Oslo") and word("(H2O)", "H2O")
    assert not word("Romeo and Juliet", "Rome") and not word("Oslo", "O") and not word("14", "4")
    assert word("New York City", "new york") and word("3.14 is pi", "3.14") and not word("3.145", "3.14")


def test_evaluation_never_scores_padding():
    """A batch of examples of different lengths is right-padded; its loss is the token-weighted mean of
    each example scored alone (padding neither scored nor attended)."""
    import transformers
    from slimtune.apps.train.tasks import evaluate, right_padded

    examples = [Example("rev ab=", "ba"), Example("rev abcdef=", "fedcba"), Example("", "plain text")]
    encoded = [encode(e, TOKENIZER) for e in examples]
    ids, labels, mask = right_padded(encoded, TOKENIZER.pad_id, "cpu")
    assert ids.shape == labels.shape == mask.shape == (3, max(len(i) for i, _ in encoded))
    first = len(encoded[0][0])
    assert (ids[0, first:] == TOKENIZER.pad_id).all() and (labels[0, first:] == -100).all()
    assert mask[0].tolist() == [1] * first + [0] * (ids.shape[1] - first)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=TOKENIZER.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, pad_token_id=TOKENIZER.pad_id,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).float()
    together = evaluate(model, TOKENIZER, examples, answers=False)["loss"]
    counts = [sum(x != -100 for x in lab[1:]) for _, lab in encoded]
    alone = [evaluate(model, TOKENIZER, [e], answers=False)["loss"] for e in examples]
    weighted_mean = sum(c * loss for c, loss in zip(counts, alone, strict=True)) / sum(counts)
    assert together == pytest.approx(weighted_mean, rel=1e-5)
