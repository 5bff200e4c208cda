"""Data pipeline: configs, tokenizers, readers, formats and masking, deterministic resumable sharded batches."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from zo2.config.data import DataConfig
from zo2.errors import ConfigError, DataError
from zo2.train.data import (BatchLoader, Example, collate, default_classification_path, default_data_path,
                            encode_record, epoch_order, fit_to_length, load_examples, read_records)
from zo2.train.tokenizer import ByteTokenizer, load_tokenizer

TOK = ByteTokenizer()
BOS, EOS, PAD = 1, 2, 0


def ids(text: str) -> list[int]:
    """Byte-tokenizer ids of ``text`` without specials."""
    return [b + 3 for b in text.encode()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def numbered(tmp_path: Path, n: int, name: str = "d.jsonl") -> Path:
    """A .jsonl file of ``n`` distinct texts 'ex0', 'ex1', ..."""
    return write_jsonl(tmp_path / name, [{"text": f"ex{i}"} for i in range(n)])


def cfg(path: Path | None = None, **kw) -> DataConfig:
    return DataConfig(path=str(path) if path is not None else None, **kw)


def texts(batch: dict[str, torch.Tensor]) -> list[str]:
    """Decode every row of a batch (byte tokenizer)."""
    return [TOK.decode(row[mask.bool()].tolist()) for row, mask in zip(batch["input_ids"], batch["attention_mask"])]


# ----- config and tokenizer --------------------------------------------------------------------------------

def test_config_defaults_and_validation():
    c = DataConfig()
    assert (c.format, c.max_length, c.batch_size, c.verbalizer) == ("auto", 64, 8, [" terrible", " great"])
    with pytest.raises(ConfigError, match=r"data\.format.*Did you mean 'text'"):
        DataConfig(format="txt")
    for bad in ({"batch_size": 0}, {"max_length": 1}, {"verbalizer": []}, {"verbalizer": [""]}, {"seed": -1},
                {"shuffle": "yes"}, {"path": ""}, {"text_field": ""}, {"template": "no fields"}):
        key = next(iter(bad))
        with pytest.raises(ConfigError, match=rf"data\.{key}"):
            DataConfig(**bad)


def test_byte_tokenizer_round_trip():
    assert TOK.vocab_size == 259 and (TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id) == (0, 1, 2)
    assert TOK.encode("A") == [1, 68] and TOK.encode("A", add_bos=False) == [68]
    text = "héllo, wörld ✓"
    assert TOK.decode(TOK.encode(text)) == text
    assert max(TOK.encode("\xff" * 3 + "✓")) < 259


def test_load_tokenizer_errors(tmp_path):
    assert isinstance(load_tokenizer(DataConfig()), ByteTokenizer)
    with pytest.raises(DataError, match="no model folder"):
        load_tokenizer(DataConfig(tokenizer="model"), None)
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="no tokenizer files"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path)))


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="needs the tokenizers package")
def test_load_hf_tokenizer_sets_pad_and_encodes(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "good": 5}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                            unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(DataConfig(tokenizer="model"), str(tmp_path / "tok"))
    assert tok.pad_token_id == tok.eos_token_id == 2
    ex = encode_record({"prompt": "hello", "completion": "world"}, "prompt_completion", DataConfig(), tok)
    assert ex.input_ids == (1, 3, 4, 2) and ex.labels == (-100, -100, 4, 2)


# ----- readers ---------------------------------------------------------------------------------------------

def test_every_file_type_gives_the_same_examples(tmp_path):
    rows = [{"prompt": "Q: 1+1?", "completion": " 2"}, {"prompt": "Q: a, b?", "completion": " c"}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "completion"])
        w.writeheader()
        w.writerows(rows)
    expected = load_examples(cfg(tmp_path / "a.jsonl"), TOK)
    assert load_examples(cfg(tmp_path / "a.json"), TOK) == expected
    assert load_examples(cfg(tmp_path / "a.csv"), TOK) == expected
    assert expected[0].input_ids == (BOS, *ids("Q: 1+1? 2"), EOS)


def test_txt_one_example_per_nonempty_line(tmp_path):
    (tmp_path / "t.txt").write_text("first line\n\n  \nsecond\n")
    records = read_records(tmp_path / "t.txt", text_field="body")
    assert [r for _, r in records] == [{"body": "first line"}, {"body": "second"}]
    assert [w for w, _ in records] == ["line 1", "line 4"]
    assert [e.input_ids for e in load_examples(cfg(tmp_path / "t.txt"), TOK)] == [
        (BOS, *ids("first line"), EOS), (BOS, *ids("second"), EOS)]


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="the datasets package is not installed")
def test_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "ab"}, {"text": "cd"}]).save_to_disk(str(tmp_path / "ds"))
    assert [e.input_ids for e in load_examples(cfg(tmp_path / "ds"), TOK)] == [
        (BOS, *ids("ab"), EOS), (BOS, *ids("cd"), EOS)]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "tr"}]),
                                   "test": datasets.Dataset.from_list([{"text": "te"}])})
    splits.save_to_disk(str(tmp_path / "dd"))
    assert [r for _, r in read_records(tmp_path / "dd")] == [{"text": "tr"}]
    del splits["train"]
    splits.save_to_disk(str(tmp_path / "dd2"))
    with pytest.raises(DataError, match="no 'train' split"):
        read_records(tmp_path / "dd2")


def test_datasets_folder_without_the_package(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        read_records(tmp_path / "ds")


@pytest.mark.parametrize("name, content, match", [
    ("missing.jsonl", None, "does not exist"),
    ("empty.jsonl", "", "holds no examples"),
    ("blank.txt", "\n \n", "holds no examples"),
    ("header_only.csv", "text,label\n", "holds no examples"),
    ("data.parquet", "x", "'.parquet', which zo2 cannot read"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": \n', r"line 2 is not valid JSON"),
    ("notobj.jsonl", '{"text": "ok"}\n["a"]\n', r"line 2 is a JSON list"),
    ("dict.json", '{"text": "a"}', "not a list of records"),
    ("latin1.txt", b"caf\xe9\n", "not UTF-8"),
])
def test_reader_errors(tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_records(path)


def test_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not a Hugging Face datasets folder"):
        read_records(tmp_path)


def test_missing_field_names_field_and_line(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "answer": "d"}])
    with pytest.raises(DataError, match=r"line 2: the record has no field 'completion'.*data\.completion_field"):
        load_examples(cfg(tmp_path / "d.jsonl"), TOK)
    write_jsonl(tmp_path / "t.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match="Cannot tell the format.*'body'"):
        load_examples(cfg(tmp_path / "t.jsonl"), TOK)
    with pytest.raises(DataError, match=r"line 1: the record has no field 'text'"):
        load_examples(cfg(tmp_path / "t.jsonl", format="text"), TOK)


def test_classification_errors(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 5}])
    with pytest.raises(DataError, match=r"line 2: label 5 is not a class index in 0\.\.1"):
        load_examples(cfg(tmp_path / "c.jsonl"), TOK)
    write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": 1}])
    with pytest.raises(DataError, match=r"line 1: data\.template = '\{sentence\} It was' uses the field 'sentence'"):
        load_examples(cfg(tmp_path / "c.jsonl", template="{sentence} It was"), TOK)


# ----- formats and masking -----------------------------------------------------------------------------------

def test_text_masking_and_padding():
    c = DataConfig()
    batch = collate([encode_record({"text": "ab"}, "text", c, TOK), encode_record({"text": "c"}, "text", c, TOK)],
                    PAD)
    a, b, cc = ids("abc")
    assert batch["input_ids"].tolist() == [[BOS, a, b, EOS], [BOS, cc, EOS, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[BOS, a, b, EOS], [BOS, cc, EOS, -100]]
    assert all(t.dtype == torch.int64 for t in batch.values())
    assert BatchLoader.tokens_in(batch) == 7 and BatchLoader.loss_tokens_in(batch) == 5


def test_prompt_completion_masking():
    ex = encode_record({"prompt": "ab", "completion": "c"}, "prompt_completion", DataConfig(), TOK)
    a, b, c = ids("abc")
    assert ex.input_ids == (BOS, a, b, c, EOS)
    assert ex.labels == (-100, -100, -100, c, EOS)


def test_classification_masking_and_auto_format(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": "ok", "label": 1}, {"text": "no", "label": "0"}])
    examples = load_examples(cfg(tmp_path / "c.jsonl", template="{text}!", verbalizer=[" n", " y"]), TOK)
    assert examples[0] == Example((BOS, *ids("ok!"), *ids(" y")), (-100, -100, -100, -100, *ids(" y")))
    assert examples[1].labels == (-100, -100, -100, -100, *ids(" n"))  # no EOS after a verbalized label


def test_truncation_keeps_start_of_text_and_the_completion():
    c = DataConfig(max_length=4)
    assert encode_record({"text": "abcdef"}, "text", c, TOK).input_ids == (BOS, *ids("abc"))
    ex = encode_record({"prompt": "abcdef", "completion": "x"}, "prompt_completion", c, TOK)
    assert ex.input_ids == (BOS, *ids("f"), *ids("x"), EOS)
    assert ex.labels == (-100, -100, *ids("x"), EOS)
    # a completion longer than the budget keeps its start and one prompt token
    assert fit_to_length([BOS, 10, 11], [20, 21, 22, 23, 24], 4) == ([11], [20, 21, 22])
    assert fit_to_length([BOS, 10], [20], 4) == ([BOS, 10], [20])


# ----- batches -----------------------------------------------------------------------------------------------

def test_shuffle_is_deterministic_and_per_epoch(tmp_path):
    path = numbered(tmp_path, 12)
    draw = lambda **kw: [texts(BatchLoader(cfg(path, batch_size=4, **kw), TOK).next_batch())]  # noqa: E731
    assert draw(seed=3) == draw(seed=3)
    assert draw(seed=3) != draw(seed=4)
    assert torch.equal(epoch_order(12, 3, 1), epoch_order(12, 3, 1))
    assert not torch.equal(epoch_order(12, 3, 0), epoch_order(12, 3, 1))
    assert epoch_order(5, 0, 0, shuffle=False).tolist() == [0, 1, 2, 3, 4]
    loader = BatchLoader(cfg(path, batch_size=4), TOK)
    assert loader.batches_per_epoch == 3
    epoch0 = sum((texts(loader.next_batch()) for _ in range(3)), [])
    assert sorted(epoch0) == sorted(f"ex{i}" for i in range(12))
    assert loader.position() == {"epoch": 1, "index": 0}


def test_seek_resumes_the_exact_batch_sequence_across_epochs(tmp_path):
    path = numbered(tmp_path, 10)
    c = cfg(path, batch_size=4)  # drop_last: 2 batches per epoch, 2 examples dropped each epoch
    reference = BatchLoader(c, TOK)
    saved, expected = None, []
    for step in range(7):
        if step == 3:
            saved = reference.position()
        batch = reference.next_batch()
        if step >= 3:
            expected.append(batch)
    assert saved == {"epoch": 1, "index": 4}
    resumed = BatchLoader(c, TOK)
    resumed.seek(json.loads(json.dumps(saved)))
    for batch in expected:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], batch[k]) for k in batch)


def test_shards_are_disjoint_and_make_up_the_global_batch(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x" * (i % 7) + str(i)} for i in range(24)])
    c = cfg(path, batch_size=8)
    whole = BatchLoader(c, TOK)
    ranks = [BatchLoader(c, TOK, rank=r, world_size=4) for r in range(4)]
    for _ in range(5):
        full = whole.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert all(p["input_ids"].shape == (2, full["input_ids"].shape[1]) for p in parts)
        for key in full:
            assert torch.equal(torch.cat([p[key] for p in parts]), full[key])
        seen = sum((texts(p) for p in parts), [])
        assert len(set(seen)) == len(seen) == 8


def test_drop_last_false_keeps_partial_batches(tmp_path):
    path = numbered(tmp_path, 5)
    loader = BatchLoader(cfg(path, batch_size=4, drop_last=False, shuffle=False), TOK)
    assert loader.batches_per_epoch == 2
    assert texts(loader.next_batch()) == ["ex0", "ex1", "ex2", "ex3"]
    assert texts(loader.next_batch()) == ["ex4"]
    assert loader.position() == {"epoch": 1, "index": 0}
    small = BatchLoader(cfg(numbered(tmp_path, 3, "s.jsonl"), batch_size=8, drop_last=False), TOK)
    assert len(texts(small.next_batch())) == 3


def test_batch_errors(tmp_path):
    path = numbered(tmp_path, 6)
    with pytest.raises(DataError, match="fewer than one batch.*drop_last"):
        BatchLoader(cfg(path, batch_size=8), TOK)
    with pytest.raises(DataError, match=r"data\.batch_size = 6 does not divide into 4"):
        BatchLoader(cfg(path, batch_size=6), TOK, world_size=4)
    with pytest.raises(DataError, match="last batch of each epoch has 1 examples"):
        BatchLoader(cfg(numbered(tmp_path, 5, "f.jsonl"), batch_size=4, drop_last=False), TOK, world_size=2)
    loader = BatchLoader(cfg(path, batch_size=2), TOK)
    for bad in ({"epoch": 0, "index": 7}, {"epoch": -1, "index": 0}, {"index": 0}, None):
        with pytest.raises(DataError, match="does not fit this dataset"):
            loader.seek(bad)
    with pytest.raises(ValueError):
        BatchLoader(cfg(path, batch_size=2), TOK, rank=2, world_size=2)


# ----- shipped data ------------------------------------------------------------------------------------------

def test_shipped_corpus_and_fixture():
    corpus = default_data_path()
    assert corpus.is_file() and corpus.stat().st_size < 100_000
    loader = BatchLoader(DataConfig(), TOK)
    assert 300 <= loader.num_examples <= 600
    batch = loader.next_batch()
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 64
    sst = [r for _, r in read_records(default_classification_path())]
    assert len(sst) == 64 and sum(r["label"] for r in sst) == 32
    examples = load_examples(DataConfig(path=str(default_classification_path())), TOK)
    verbalized = {0: ids(" terrible"), 1: ids(" great")}
    for record, ex in zip(sst, examples):
        assert [t for t in ex.labels if t != -100] == verbalized[record["label"]]
