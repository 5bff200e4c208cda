"""MeZO's task suite: loading, prompt templates, few-shot sampling, metrics, the candidate loss, greedy
generation and evaluation through the engine."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zo2.config.loader import field_docs
from zo2.config.task import TaskConfig
from zo2.config.data import DataConfig
from zo2.config.zo import ZOConfig
from zo2.engine import ZOEngine
from zo2.errors import ConfigError, DataError
from zo2.tasks import (TaskExample, TaskLoader, accuracy, candidate_loss, candidate_scores, candidate_texts,
                       collate_examples, encode_example, encode_prompt, evaluate_task, evaluate_with, exact_match,
                       f1_score, get_task, greedy_generate, load_split, load_task, metric_name, normalize_answer,
                       predict, prompt_text, qa_scores, sample_eval, sample_train_dev, split_sources, task_loss_fn,
                       task_names, token_f1, trains_as_classification)
from zo2.train.tokenizer import ByteTokenizer
from zo2_testing import tiny_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tasks"
TOK = ByteTokenizer()


def splits(name: str):
    """(train, eval) examples of a task's fixture folder."""
    task = get_task(name)
    train, evals = split_sources(FIXTURES / name.lower())
    return load_split(task, train), load_split(task, evals)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def byte_model(**overrides):
    """A tiny OPT model whose vocabulary covers the byte tokenizer."""
    return tiny_model("opt", vocab_size=TOK.vocab_size, max_position_embeddings=256, **overrides)


# ----- loading and templates -------------------------------------------------------------------------------

SIZES = {"SST2": (8, 3), "RTE": (6, 2), "CB": (6, 2), "BoolQ": (4, 2), "WSC": (4, 2), "WIC": (4, 2),
         "MultiRC": (6, 2), "Copa": (4, 2), "ReCoRD": (3, 1), "SQuAD": (3, 2), "DROP": (2, 1)}

# (split, index) → the text before the answer, and the full text of every candidate (or of the gold answer)
GOLDEN = {
    "SST2": ("eval", 0, "it 's a charming and often affecting journey . It was",
             ["it 's a charming and often affecting journey . It was terrible",
              "it 's a charming and often affecting journey . It was great"]),
    "RTE": ("eval", 0, 'Dogs were barking all night in the yard.\nDoes this mean that "Animals were noisy at night." '
                       'is true? Yes or No?\n',
            ['Dogs were barking all night in the yard.\nDoes this mean that "Animals were noisy at night." is true? '
             'Yes or No?\nYes',
             'Dogs were barking all night in the yard.\nDoes this mean that "Animals were noisy at night." is true? '
             'Yes or No?\nNo']),
    "CB": ("eval", 1, 'Suppose Nobody believed the bridge would hold. Can we infer that "the bridge would hold"? Yes, '
                      'No, or Maybe?\n',
           ['Suppose Nobody believed the bridge would hold. Can we infer that "the bridge would hold"? Yes, No, or '
            f'Maybe?\n{word}' for word in ("Yes", "No", "Maybe")]),
    "BoolQ": ("train", 0, "The Pacific Ocean is the largest and deepest of Earth's oceanic divisions. Is the pacific "
                          "the largest ocean?\n",
              ["The Pacific Ocean is the largest and deepest of Earth's oceanic divisions. Is the pacific the largest "
               f"ocean?\n{word}" for word in ("Yes", "No")]),
    "WSC": ("eval", 0, 'The fish ate the worm. It was tasty.\nIn the previous sentence, does the pronoun "it" refer to '
                       'worm? Yes or No?\n',
            ['The fish ate the worm. It was tasty.\nIn the previous sentence, does the pronoun "it" refer to worm? Yes '
             f'or No?\n{word}' for word in ("No", "Yes")]),
    "WIC": ("eval", 0, 'Does the word "bark" have the same meaning in these two sentences? Yes, No?\nThe dog\'s bark '
                       'woke me.\nThe bark of the oak is rough.\n',
            ['Does the word "bark" have the same meaning in these two sentences? Yes, No?\nThe dog\'s bark woke '
             f'me.\nThe bark of the oak is rough.\n{word}' for word in ("No", "Yes")]),
    "MultiRC": ("eval", 1, '<b>Sent 1: </b>Omar plants tomatoes every spring.<br>\nQuestion: What does Omar plant?\n'
                           'I found this answer "Roses". Is that correct? Yes or No?\n',
                ['<b>Sent 1: </b>Omar plants tomatoes every spring.<br>\nQuestion: What does Omar plant?\nI found '
                 f'this answer "Roses". Is that correct? Yes or No?\n{word}' for word in ("No", "Yes")]),
    "Copa": ("eval", 0, "The man broke his toe because",
             ["The man broke his toe because he dropped a hammer on his foot.",
              "The man broke his toe because I got a hole in my sock."]),
    "ReCoRD": ("eval", 0, "The Nile flows north through Egypt.\n- Cairo lies on the Nile\n-",
               [f"The Nile flows north through Egypt.\n- Cairo lies on the Nile\n- {e} is the capital of Egypt."
                for e in ("Cairo", "Egypt", "Nile")]),
    "SQuAD": ("eval", 0, "Title: Moon\nContext: The Moon orbits Earth every 27 days.\nQuestion: How often does the "
                         "Moon orbit Earth?\nAnswer:",
              ["Title: Moon\nContext: The Moon orbits Earth every 27 days.\nQuestion: How often does the Moon orbit "
               "Earth?\nAnswer: every 27 days\n"]),
    "DROP": ("eval", 0, "Passage: The town had 300 people in 1900 and 450 in 1950.\nQuestion: How many more people "
                        "lived in the town in 1950 than in 1900?\nAnswer:",
             ["Passage: The town had 300 people in 1900 and 450 in 1950.\nQuestion: How many more people lived in the "
              "town in 1950 than in 1900?\nAnswer: 150\n"]),
}


@pytest.mark.parametrize("name", task_names())
def test_fixture_loads_and_formats_as_the_template_says(name):
    train, evals = splits(name)
    assert (len(train), len(evals)) == SIZES[name]
    split, index, prompt, candidates = GOLDEN[name]
    example = (train if split == "train" else evals)[index]
    task = get_task(name)
    assert prompt_text(task, example) == prompt
    assert candidate_texts(task, example) == candidates
    # the answer tokens are the candidate text beyond the prompt, at the end of each row
    encoded = encode_example(task, example, TOK)
    for row, option_len, text in zip(encoded.rows, encoded.option_lens, candidates):
        assert TOK.decode(row) == text and TOK.decode(row[-option_len:]) == text[len(prompt):]


def test_labels_and_candidates():
    _, copa = splits("Copa")
    assert copa[0].candidates == ("He dropped a hammer on his foot.", "I got a hole in my sock.")
    assert (copa[0].correct, copa[0].label) == ((0,), 0)
    train, _ = splits("ReCoRD")
    assert train[1].candidates == ("Houston", "Kim Park", "Park") and train[1].correct == (1, 2)
    assert train[2].correct == (0,) and train[1].label is None
    _, squad = splits("SQuAD")
    assert squad[0].answers == ("every 27 days", "27 days") and squad[0].candidates == ()
    train, _ = splits("BoolQ")
    assert [ex.correct[0] for ex in train] == [0, 1, 1, 0]  # "Yes" is candidate 0: true → 0
    train, _ = splits("CB")
    assert [ex.label for ex in train] == [2, 0, 1, 0, 1, 2]  # entailment, contradiction, neutral → Yes, No, Maybe


def test_copa_effect_and_lowercased_choice():
    train, _ = splits("Copa")
    task = get_task("copa")
    assert candidate_texts(task, train[2]) == ["The girl found a bug in her cereal so she poured milk in the bowl.",
                                               "The girl found a bug in her cereal so she lost her appetite."]


def test_demonstrations_precede_the_prompt():
    train, evals = splits("SST2")
    task = get_task("SST2")
    assert prompt_text(task, evals[0], train[:2]) == (
        "a gorgeous , witty , seductive movie . It was great\n\nthe plot is nothing but boilerplate clichés . It was "
        "terrible\n\nit 's a charming and often affecting journey . It was")
    _, squad = splits("SQuAD")
    train, _ = splits("SQuAD")
    text = prompt_text(get_task("squad"), squad[1], train[:1])
    assert text.startswith("Title: Oxygen\nContext: Oxygen is element 8. It was named by Lavoisier in 1777.\nQuestion: "
                           "Who named oxygen?\nAnswer: Lavoisier\n\nTitle: Paris\n")


def test_glue_tsv_keeps_quotes():
    _, dev = splits("SST2")
    assert dev[2].data["sentence"] == 'the acting is "wonderful" . '


def test_hf_layouts_give_the_same_examples(tmp_path):
    """The HF datasets column layout (flat rows, integer labels) reads as the SuperGLUE jsonl files do."""
    flat_multirc = [{"paragraph": "<b>Sent 1: </b>Omar plants tomatoes every spring.<br>",
                     "question": "What does Omar plant?", "answer": a, "label": y,
                     "idx": {"paragraph": 0, "question": 0, "answer": i}}
                    for i, (a, y) in enumerate([("Tomatoes", 1), ("Roses", 0)])]
    flat_record = [{"passage": "The Nile flows north through Egypt.\n@highlight\nCairo lies on the Nile",
                    "query": "@placeholder is the capital of Egypt.", "entities": ["Cairo", "Egypt", "Nile"],
                    "entity_spans": {"text": [], "start": [], "end": []}, "answers": ["Cairo"],
                    "idx": {"passage": 0, "query": 0}}]
    flat_wsc = [{"text": "The fish ate the worm. It was tasty.", "span1_index": 3, "span2_index": 5,
                 "span1_text": "worm", "span2_text": "It", "idx": 0, "label": 1},
                {"text": "Anna did a lot better than her friend on the test because she had studied so hard.",
                 "span1_index": 6, "span2_index": 12, "span1_text": "her friend", "span2_text": "she", "idx": 1,
                 "label": 0}]
    hf_rte = [{"premise": "Dogs were barking all night in the yard.", "hypothesis": "Animals were noisy at night.",
               "idx": 0, "label": 0},
              {"premise": "The concert was cancelled because of the storm.", "hypothesis": "The concert took place.",
               "idx": 1, "label": 1}]
    hf_boolq = [{"question": "is water made of hydrogen and oxygen",
                 "passage": "A water molecule has two hydrogen atoms and one oxygen atom.", "answer": True},
                {"question": "does the sun orbit the earth", "passage": "The Earth orbits the Sun once a year.",
                 "answer": False}]
    for name, records in (("MultiRC", flat_multirc), ("ReCoRD", flat_record), ("WSC", flat_wsc), ("RTE", hf_rte),
                          ("BoolQ", hf_boolq)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", records)
        assert load_split(get_task(name), path) == splits(name)[1], name


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="the datasets package is not installed")
def test_datasets_folders(tmp_path):
    import datasets

    train, evals = splits("SQuAD")
    rows = [json.loads(line) for line in (FIXTURES / "squad" / "validation.jsonl").read_text().splitlines()]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "squad"))
    train_source, eval_source = split_sources(tmp_path / "squad")
    assert (train_source.split, eval_source.split) == ("train", "validation")
    assert load_split(get_task("squad"), eval_source) == evals
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    assert load_split(get_task("squad"), tmp_path / "one") == evals


def test_datasets_folder_without_the_package(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        load_split(get_task("rte"), folder)


# ----- bad input -------------------------------------------------------------------------------------------

def test_unknown_task_suggests_a_name():
    with pytest.raises(ConfigError, match=r"Unknown task 'recrod'\. Did you mean 'ReCoRD'\?.*SQuAD"):
        get_task("recrod")
    assert get_task("sst-2").name == "SST2" and get_task("wic").name == "WIC"
    with pytest.raises(ConfigError, match="Did you mean 'BoolQ'"):
        TaskConfig(name="boolk")
    assert TaskConfig(name="multi-rc").name == "MultiRC"


def test_missing_paths_and_splits(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        split_sources(tmp_path / "nowhere")
    write_jsonl(tmp_path / "rte" / "train.jsonl", [{"premise": "a", "hypothesis": "b", "label": 0}])
    with pytest.raises(DataError, match=r"no validation split: looked for validation\.jsonl.*val\.jsonl"):
        split_sources(tmp_path / "rte")
    with pytest.raises(DataError, match="holds a single split. Set task.eval_path"):
        split_sources(tmp_path / "rte" / "train.jsonl")
    train, evals = split_sources(tmp_path / "rte" / "train.jsonl", FIXTURES / "rte")
    assert train.path.name == "train.jsonl" and evals.path.name == "val.jsonl"
    with pytest.raises(DataError, match="No task data"):
        split_sources(None)


@pytest.mark.parametrize("name, record, match", [
    ("RTE", {"premise": "a", "label": 0}, r"no field 'hypothesis'.*RTE reads SuperGLUE RTE records"),
    ("RTE", {"premise": "a", "hypothesis": "b", "label": "maybe"}, r"label 'label' = 'maybe' is not a class.*"
                                                                   r"'not_entailment'"),
    ("CB", {"premise": "a", "hypothesis": "b", "label": -1}, r"unlabeled \(test split\)"),
    ("BoolQ", {"passage": "p", "question": "q"}, r"no field 'label'"),
    ("WSC", {"text": "t", "target": [1], "label": True}, r"'target'.*must be a JSON object"),
    ("Copa", {"premise": "p", "choice1": "a", "choice2": "b", "question": "why", "label": 0}, "'cause' or 'effect'"),
    ("ReCoRD", {"passage": "p", "query": "@placeholder", "entities": ["A"], "answers": ["B"]}, "no correct candidate"),
    ("SQuAD", {"title": "t", "context": "c", "question": "q", "answers": {"text": [], "answer_start": []}},
     "no reference answer"),
    ("DROP", {"passage": "p", "question": "q", "answers_spans": "x"}, r"must be a list of strings or \{'spans'"),
])
def test_bad_records_name_the_problem(tmp_path, name, record, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError, match=match) as info:
        load_split(get_task(name), path)
    assert str(info.value).startswith(f"{path}, line 1: ")


def test_unreadable_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(DataError, match=r"line 1 is not valid JSON"):
        load_split(get_task("rte"), bad)
    with pytest.raises(DataError, match=r"extension '\.csv'"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_split(get_task("rte"), tmp_path / "x.csv")


# ----- metrics ---------------------------------------------------------------------------------------------

def test_answer_normalization_and_scores():
    assert normalize_answer("  The Cat's   hat!  ") == "cats hat"
    assert normalize_answer("An apple, a day.") == "apple day"
    # "big red dog" vs "red dog": 2 shared words, precision 2/3, recall 1 → F1 = 0.8
    assert token_f1("the big red dog", "a red dog") == pytest.approx(0.8)
    assert token_f1("blue", "red dog") == 0.0
    assert f1_score("red dog", ["a cat", "the red dog."]) == 1.0
    # "27 days" vs "every 27 days": precision 1, recall 2/3 → F1 = 0.8
    assert f1_score("27 days", ["every 27 days"]) == pytest.approx(0.8)
    assert exact_match("The Red Dog", ["red dog!"]) == 1.0 and exact_match("red", ["red dog"]) == 0.0
    assert f1_score("no answer", ["no answer"]) == 1.0 and f1_score("answer", ["no answer"]) == 0.0
    scores = qa_scores(["27 days", "Paris", "Rome"], [["every 27 days"], ["Paris"], ["Madrid"]])
    assert scores["f1"] == pytest.approx((0.8 + 1 + 0) / 3) and scores["em"] == pytest.approx(1 / 3)
    assert accuracy([0, 2, 1, 1], [(0,), (1,), (1, 2), (0,)]) == 0.5


# ----- few-shot sampling -----------------------------------------------------------------------------------

def sentiment(n_per_class: int) -> list[TaskExample]:
    task = get_task("sst2")
    return [ex for i in range(n_per_class) for label in (0, 1)
            for ex in task.examples({"sentence": f"s{label}-{i}", "label": label}, "test")]


def test_k_shot_per_class_is_seeded():
    pool = sentiment(20)
    train, dev = sample_train_dev(get_task("sst2"), pool, k_shot=4, num_dev=3, seed=1)
    assert [sum(ex.label == c for ex in train) for c in (0, 1)] == [4, 4]
    assert [sum(ex.label == c for ex in dev) for c in (0, 1)] == [3, 3]
    assert not {ex.data["sentence"] for ex in train} & {ex.data["sentence"] for ex in dev}
    assert sample_train_dev(get_task("sst2"), pool, k_shot=4, num_dev=3, seed=1) == (train, dev)
    other, _ = sample_train_dev(get_task("sst2"), pool, k_shot=4, num_dev=3, seed=2)
    assert other != train
    with pytest.raises(DataError, match="class 0 has only 20"):
        sample_train_dev(get_task("sst2"), pool, k_shot=15, num_dev=6)


def test_k_shot_without_classes_takes_k_in_total():
    train, _ = splits("SQuAD")
    picked, dev = sample_train_dev(get_task("squad"), train, k_shot=2, num_dev=0, seed=0)
    assert len(picked) == 2 and dev == []


def test_num_train_follows_mezo_permutation():
    pool = sentiment(10)
    np.random.seed(3)  # MeZO: temp_seed(seed) then np.random.permutation(len)[:num_train + num_dev]
    order = np.random.permutation(len(pool)).tolist()[:9]
    train, dev = sample_train_dev(get_task("sst2"), pool, num_train=6, num_dev=3, seed=3)
    assert train == [pool[i] for i in order[:6]] and dev == [pool[i] for i in order[6:]]
    with pytest.warns(UserWarning, match="training on 17"):
        train, dev = sample_train_dev(get_task("sst2"), pool, num_train=1000, num_dev=3, seed=3)
    assert (len(train), len(dev)) == (17, 3)
    with pytest.raises(DataError, match="none are left to train on"):
        sample_train_dev(get_task("sst2"), pool, num_train=5, num_dev=20)
    assert sample_eval(pool, 4, seed=3) == [pool[i] for i in np.random.RandomState(3).permutation(20)[:4]]
    assert sample_eval(pool, None) == pool


def test_task_config_and_load_task():
    cfg = TaskConfig(name="rte", path=str(FIXTURES / "rte"), num_train=4, num_dev=2, num_eval=1, train_set_seed=5)
    data = load_task(cfg)
    assert (len(data.train), len(data.dev), len(data.eval)) == (4, 2, 1)
    assert load_task(cfg).train == data.train
    assert trains_as_classification(cfg, data.task) and metric_name(cfg, data.task) == "accuracy"
    squad = TaskConfig(name="squad", eval_path=str(FIXTURES / "squad" / "validation.jsonl"), num_eval=None)
    data = load_task(squad)
    assert (data.train, len(data.eval)) == ([], 2)
    assert not trains_as_classification(squad, data.task) and metric_name(squad, data.task) == "f1"
    with pytest.raises(ConfigError, match="generation task"):
        trains_as_classification(TaskConfig(name="drop", train_as_classification=True), get_task("drop"))
    with pytest.raises(ConfigError, match=r"task\.metric = 'accuracy' does not apply to SQuAD"):
        metric_name(TaskConfig(name="squad", metric="accuracy"), get_task("squad"))
    for bad in ({"k_shot": 0}, {"num_train": -1}, {"num_eval": 0}, {"train_set_seed": -1}, {"metric": "f2"},
                {"max_length": 10, "max_new_tokens": 50}, {"eval_batch_size": 0}, {"path": ""},
                {"train_as_classification": "yes"}):
        key = next(iter(bad))
        with pytest.raises(ConfigError, match=rf"task\.{key}"):
            TaskConfig(**bad)
    docs = field_docs(TaskConfig)
    assert all(f in docs for f in TaskConfig.__dataclass_fields__)


# ----- the candidate-scoring loss --------------------------------------------------------------------------

def mixed_batch():
    """Examples with 2, 3 and 3 candidates (RTE, CB, ReCoRD with two correct entities)."""
    _, rte = splits("RTE")
    _, cb = splits("CB")
    record, _ = splits("ReCoRD")
    encoded = [encode_example(get_task("rte"), rte[1], TOK), encode_example(get_task("cb"), cb[0], TOK),
               encode_example(get_task("record"), record[1], TOK, max_length=60)]
    return encoded, collate_examples(encoded, TOK.pad_token_id)


def direct_loss(logits, encoded, normalize):
    """Per row, log-softmax and the answer tokens' log-likelihood; per example, cross-entropy over candidates."""
    losses, row = [], 0
    for ex in encoded:
        scores = []
        for ids, option in zip(ex.rows, ex.option_lens):
            logp = torch.log_softmax(logits[row].double(), dim=-1)
            start = len(ids) - option
            total = sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))
            scores.append(total / option if normalize else total)
            row += 1
        losses.append(-torch.log_softmax(torch.stack(scores), 0)[ex.gold])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("normalize", [True, False])
def test_candidate_loss_equals_a_direct_computation(normalize):
    encoded, batch = mixed_batch()
    assert batch["input_ids"].shape[0] == 8 and batch["candidate_group"].tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert encoded[2].gold == 1 and encoded[2].correct == (1, 2)
    logits = torch.randn(*batch["input_ids"].shape, TOK.vocab_size, generator=torch.Generator().manual_seed(0)) * 3
    loss = candidate_loss(logits, batch, length_normalize=normalize)
    assert loss.item() == pytest.approx(direct_loss(logits, encoded, normalize).item(), rel=1e-5)
    assert task_loss_fn(True, length_normalize=normalize)(logits, batch).item() == loss.item()
    scores = candidate_scores(logits, batch, length_normalize=normalize).tolist()
    firsts = [0, 2, 5]
    for g, (ex, first) in enumerate(zip(encoded, firsts)):
        mine = scores[first: first + len(ex.rows)]
        assert predict(scores, encoded)[g] == int(np.argmax(mine))


def test_gold_answer_loss_and_labels():
    encoded, batch = mixed_batch()
    gold_rows = batch["candidate_gold"].nonzero().flatten().tolist()
    assert gold_rows == [1, 2, 6]  # RTE 'No', CB 'Maybe'... the first correct candidate of each example
    labelled = (batch["labels"] != -100).sum(-1).tolist()
    assert [n for i, n in enumerate(labelled) if i not in gold_rows] == [0] * 5
    assert labelled[1] == encoded[0].option_lens[1]
    logits = torch.randn(*batch["input_ids"].shape, TOK.vocab_size)
    assert torch.isfinite(task_loss_fn(False)(logits, batch))
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with pytest.raises(DataError, match=r"needs the batch tensors \['option_mask'"):
        candidate_loss(logits, plain)
    _, copa = splits("Copa")  # without the candidate loss only the gold answer's row is trained on
    only = encode_example(get_task("copa"), copa[1], TOK, all_candidates=False)
    assert [TOK.decode(r) for r in only.rows] == ["I knocked on my neighbor's door so my neighbor invited me in."]
    assert (only.gold, only.correct) == (0, (0,))


# ----- generation ------------------------------------------------------------------------------------------

def plain_greedy(model, prompt, max_new_tokens, stops):
    ids = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if token in stops:
            break
        ids.append(token)
        out.append(token)
    return out


def test_greedy_generation_equals_a_plain_loop():
    model = byte_model().eval()
    _, squad = splits("SQuAD")
    train, _ = splits("SQuAD")
    task = get_task("squad")
    prompts = [encode_prompt(task, ex, TOK, max_length=200, max_new_tokens=6) for ex in squad + train[:1]]
    assert len({len(p) for p in prompts}) == 3
    stops = {13, 2}

    def logits_fn(batch):
        return model(**batch).logits

    got = greedy_generate(logits_fn, prompts, max_new_tokens=6, stop_ids=stops, pad_id=0)
    assert got == [plain_greedy(model, p, 6, stops) for p in prompts]
    first = got[0][0]
    stopped = greedy_generate(logits_fn, prompts, max_new_tokens=6, stop_ids={first}, pad_id=0)
    assert stopped[0] == [] and stopped == [plain_greedy(model, p, 6, {first}) for p in prompts]


# ----- evaluation through the engine -----------------------------------------------------------------------

def test_evaluate_task_on_a_tiny_engine(capsys):
    model = byte_model()
    engine = ZOEngine(model, ZOConfig(lr=0.0, seed=1))

    def plain(batch):
        return model(**batch).logits

    _, sst2 = splits("SST2")
    result = evaluate_task(engine, "sst2", sst2, TOK, batch_size=2, progress=False, return_predictions=True)
    assert set(result) == {"accuracy", "examples", "predictions"} and result["examples"] == 3
    assert result == evaluate_with(plain, "sst2", sst2, TOK, batch_size=3, progress=False, return_predictions=True)
    assert result["accuracy"] == accuracy(result["predictions"], [ex.correct for ex in sst2])

    _, squad = splits("SQuAD")
    qa = evaluate_task(engine, "squad", squad, TOK, max_new_tokens=4, max_length=200, progress=False,
                       return_predictions=True)
    assert set(qa) == {"f1", "em", "examples", "predictions"} and len(qa["predictions"]) == 2
    assert qa == evaluate_with(plain, "squad", squad, TOK, max_new_tokens=4, max_length=200, progress=False,
                               return_predictions=True)
    assert qa["f1"] == pytest.approx(qa_scores(qa["predictions"], [ex.answers for ex in squad])["f1"])
    answer_engine = ZOEngine(model, ZOConfig(lr=0.0, seed=1), loss_fn=task_loss_fn(False))
    assert evaluate_task(answer_engine, "squad", squad, TOK, max_new_tokens=4, max_length=200, progress=False,
                         return_predictions=True) == qa
    assert capsys.readouterr().err == ""
    evaluate_task(engine, "sst2", sst2[:1], TOK, progress=True)
    assert "eval SST2" in capsys.readouterr().err


def test_zo_steps_on_task_batches():
    """The candidate loss drives ZOEngine steps on TaskLoader batches (deterministic and resumable)."""
    train, _ = splits("CB")
    task = get_task("cb")
    encoded = [encode_example(task, ex, TOK, max_length=120) for ex in train]
    loader = TaskLoader(DataConfig(batch_size=2, seed=4), TOK, encoded)
    first = loader.next_batch()
    assert first["input_ids"].shape[0] == 6 and int(first["candidate_gold"].sum()) == 2
    position = loader.position()
    second = loader.next_batch()
    again = TaskLoader(DataConfig(batch_size=2, seed=4), TOK, encoded)
    again.seek(position)
    assert all(torch.equal(second[k], v) for k, v in again.next_batch().items())
    engine = ZOEngine(byte_model(), ZOConfig(lr=1e-3, eps=1e-3, seed=2), loss_fn=task_loss_fn(True))
    results = [engine.step(loader.next_batch()) for _ in range(2)]
    assert all(np.isfinite(r.loss) and not r.skipped for r in results)
    assert evaluate_task(engine, task, train[:2], TOK, progress=False)["examples"] == 2


def test_data_parallel_shards_weight_the_candidate_loss_by_examples():
    """Ranks combine Σ L_r w_r / Σ w_r with w = the loss function's weight (examples for the candidate loss), which
    must give the whole batch's loss — not a token-weighted mean."""
    from zo2.engine import loss_weight
    from zo2.tasks import collate_examples, encode_example, get_task, task_loss_fn

    task = get_task("rte")
    examples = splits("rte")[0][:4]
    encoded = [encode_example(task, ex, TOK, max_length=256) for ex in examples]
    model = byte_model().eval()
    loss_fn = task_loss_fn(True)

    def loss_of(part):
        batch = collate_examples(part, TOK.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float(loss_fn(logits, batch)), loss_weight(loss_fn, batch)

    whole, n = loss_of(encoded)
    (a, wa), (b, wb) = loss_of(encoded[:1]), loss_of(encoded[1:])
    assert (n, wa, wb) == (4, 1, 3)
    assert (a * wa + b * wb) / (wa + wb) == pytest.approx(whole, rel=1e-5)


def test_wsc_jsonl_spans_are_repaired_as_wsc_fixed_does(tmp_path):
    """SuperGLUE's WSC.jsonl writes some spans with another casing or a trailing "." than the sentence has; MeZO
    reads super_glue/wsc.fixed, whose builder repairs them. The jsonl layout gets the same repair; spans found
    verbatim, and the HF layout (already fixed), are left alone."""
    records = [
        {"text": "The trophy doesn't fit into the suitcase because it is too big.", "label": True,
         "target": {"span1_index": 0, "span1_text": "the trophy", "span2_index": 8, "span2_text": "it"}},
        {"text": "Joan thanked Susan for the help she had given.", "label": False,
         "target": {"span1_index": 2, "span1_text": "Susan.", "span2_index": 6, "span2_text": "she"}},
        {"text": "the dog chased the cat because it was\nhungry.", "label": True,
         "target": {"span1_index": 0, "span1_text": "The dog\nitself", "span2_index": 6, "span2_text": "it"}},
    ]
    got = load_split(get_task("WSC"), write_jsonl(tmp_path / "wsc.jsonl", records))
    spans = [(e.data["span1_text"], e.data["span2_text"]) for e in got]
    assert spans == [("The trophy", "it"), ("Susan", "she"), ("the dog itself", "it")]
    prompt = get_task("WSC").prompt(got[0])
    assert prompt.endswith('does the pronoun "it" refer to The trophy? Yes or No?\n')
    assert 'refer to Susan? Yes or No?' in get_task("WSC").prompt(got[1])
    flat = [{"text": records[0]["text"], "span1_index": 0, "span1_text": "the trophy", "span2_index": 8,
             "span2_text": "it", "label": 1}]
    assert load_split(get_task("WSC"), write_jsonl(tmp_path / "flat.jsonl", flat))[0].data["span1_text"] == \
        "the trophy"


@pytest.mark.parametrize("name", ["SQuAD", "DROP"])
def test_generation_training_rows_leave_room_for_the_answer_as_mezo_cuts_them(name):
    """MeZO encodes SQuAD/DROP training rows as generation prompts with the gold answer, cut to max_length -
    max_new_tokens; classification rows keep max_length."""
    from zo2.config import load_config
    from zo2.train.task_run import build_task_run

    sets = [f"task.name={name.lower()}", f"task.path={FIXTURES / name.lower()}", "task.max_length=40",
            "task.max_new_tokens=10", "task.num_dev=0", "data.batch_size=1"]
    run = build_task_run(load_config(overrides=sets), TOK, None)
    longest = max(len(row) for ex in run.loader.examples for row in ex.rows)
    full = max(len(row) for ex in build_task_run(load_config(overrides=[*sets, "task.max_length=2048"]), TOK,
                                                 None).loader.examples for row in ex.rows)
    assert full > 40 and longest == 30  # the fixture's rows are long enough to be cut
    sst2 = build_task_run(load_config(overrides=["task.name=sst2", f"task.path={FIXTURES / 'sst2'}",
                                                 "task.max_length=30", "task.max_new_tokens=20", "task.num_dev=0",
                                                 "data.batch_size=1"]),
                          TOK, None)
    assert max(len(row) for ex in sst2.loader.examples for row in ex.rows) == 30
