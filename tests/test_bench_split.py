"""Split logic: disjoint, class-balanced where possible, deterministic."""
import pytest

from mergelab.bench import data
from mergelab.errors import MergelabError


def _examples():
    ex = [(f"a text {i}", "a") for i in range(100)]
    ex += [(f"b text {i}", "b") for i in range(100)]
    ex += [(f"c text {i}", "c") for i in range(12)]  # a short class
    ex += [("a text 3", "a"), ("A TEXT 4", "b")]  # duplicates (case-insensitive): dropped
    ex += [("ignored", "zzz")]  # class not asked for
    return ex


def test_disjoint_balanced_deterministic():
    classes = ["a", "b", "c"]
    test, val, train = data.split_balanced(_examples(), classes, [30, 30, 60], seed=1)
    assert (len(test), len(val), len(train)) == (30, 30, 60)
    texts = [set(t for t, _ in s) for s in (test, val, train)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    count = lambda s, k: sum(1 for _, y in s if y == k)
    assert [count(test, k) for k in range(3)] == [10, 10, 10]  # balanced
    assert [count(val, k) for k in range(3)] == [14, 14, 2]  # c runs out: filled from a and b
    assert count(train, 2) == 0
    again = data.split_balanced(list(reversed(_examples())), classes, [30, 30, 60], seed=1)
    assert again == [test, val, train]  # independent of input order
    other = data.split_balanced(_examples(), classes, [30, 30, 60], seed=2)
    assert other != [test, val, train]


def test_duplicates_removed_and_sizes_capped():
    (only,) = data.split_balanced(_examples(), ["a", "b", "c"], [10_000])
    # "a text 3" is listed twice (kept once); "A TEXT 4" (b) repeats "a text 4" (a): both dropped
    assert len(only) == 99 + 100 + 12
    assert len({t.casefold() for t, _ in only}) == len(only)


def test_load_task_registered_in_memory():
    data.register_task(data.TaskSpec("tiny_split_task", "test", _examples, None), overwrite=True)
    td = data.load_task("tiny_split_task", n_train=50, n_val=20, n_test=40, seed=0)
    assert td.classes == ["a", "b", "c", "zzz"]  # spec.classes None: every label found, sorted
    assert td.sizes() == {"train": 50, "val": 20, "test": 40}
    assert not set(td.train.texts) & set(td.test.texts)
    td2 = data.load_task("tiny_split_task", n_train=50, n_val=20, n_test=40, seed=0)
    assert td2.test.texts == td.test.texts and td2.train.labels == td.train.labels


def test_load_task_unknown():
    with pytest.raises(MergelabError, match="unknown task"):
        data.load_task("no_such_task")


def test_text6_split_sizes_real_data():
    td = data.load_task("wordnet_verb", n_train=80, n_val=16, n_test=40, seed=0)
    assert td.sizes() == {"train": 80, "val": 16, "test": 40}
    assert sorted(td.test.labels.count(k) for k in range(8)) == [5] * 8
    assert not set(td.train.texts) & (set(td.val.texts) | set(td.test.texts))
