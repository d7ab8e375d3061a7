"""Two kinds of recipe keys: operational ones change on resume and are recorded; the others define training."""

from __future__ import annotations

import pytest
from conftest import REPO

from livt_ds.config import load_recipe, recipe_to_dict
from livt_ds.errors import ConfigError
from livt_ds.provenance import OPERATIONAL_KEYS, History, check_resume_recipe, is_operational

OPERATIONAL = ["data.retries=20", "data.timeout_s=5", "data.cache_dir=/tmp/cache", "data.num_workers=2",
               "data.retry_backoff_s=3", "data.cache_max_gb=1", "log.every_steps=7", "eval.batch_size=4",
               "checkpoint.keep_last=9", "train.stop_after_steps=4"]


def recipe(*overrides: str) -> dict:
    return recipe_to_dict(load_recipe(REPO / "configs" / "tiny_bft.yaml", list(overrides)))


def check(old: dict, new: dict, digests=(None, None)) -> dict:
    return check_resume_recipe(old, new, allow=False, checkpoint="runs/x/checkpoints/step00000003", output="runs/x",
                               data_sha256=digests)


def test_operational_keys_pass_on_resume_without_the_flag():
    old = recipe("data.path=shards/toy")
    diff = check(old, recipe("data.path=shards/toy", *OPERATIONAL))
    assert set(diff) == {o.split("=")[0] for o in OPERATIONAL}
    assert diff["data.retries"] == [5, 20] and diff["data.num_workers"] == [0, 2]


@pytest.mark.parametrize("path", ["shards/toy/", f"{REPO}/shards/toy", f"file://{REPO}/shards/toy"])
def test_another_spelling_of_the_data_path_passes(path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert check(recipe("data.path=shards/toy"), recipe(f"data.path={path}")) == {
        "data.path": ["shards/toy", path]}


def test_a_copy_of_the_set_passes_and_another_set_is_refused(monkeypatch):
    monkeypatch.chdir(REPO)
    old, url = recipe("data.path=shards/toy"), recipe("data.path=http://127.0.0.1:8123/toy")
    assert set(check(old, url, ("abc", "abc"))) == {"data.path"}  # the same meta.json behind a URL
    with pytest.raises(ConfigError, match="data.path: 'shards/toy' -> 'http://127.0.0.1:8123/toy'"):
        check(old, url, ("abc", "def"))
    with pytest.raises(ConfigError, match="data.path"):  # no digest known: only the spelling can tell
        check(old, url)
    with pytest.raises(ConfigError, match="data.path"):
        check(old, recipe("data.path=shards/other"), ("abc", "def"))


def test_training_keys_are_still_refused_next_to_operational_ones():
    with pytest.raises(ConfigError) as err:
        check(recipe(), recipe("data.retries=20", "loss.name=ce", "data.train_split=val", "data.eval_split=train"))
    text = str(err.value)
    assert "loss.name" in text and "data.train_split" in text and "data.eval_split" in text
    assert "data.retries" not in text
    assert not is_operational("data.mean") and not is_operational("model.init") and is_operational("log.tensorboard")


def test_history_records_operational_changes_with_before_and_after(tmp_path):
    history = History(tmp_path)
    kwargs = {"stage": "finetune", "world_size": 1, "hosts": ["h"], "resumed_from": None, "schedule": {}}
    history.start(recipe=recipe("data.path=shards/toy"), start_step=0, diff=None, data_sha256="abc", **kwargs)
    history.start(recipe=recipe("data.path=http://h/toy", "data.retries=20", "train.epochs=3"), start_step=3,
                  diff=None, data_sha256="abc", **kwargs)
    history.start(recipe=recipe("data.path=shards/other", "data.retries=20", "train.epochs=3"), start_step=3,
                  diff=None, data_sha256="def", **kwargs)
    first, second, third = history.records()
    assert first["changes"] == {"operational": {}, "training": {}} and first["data_sha256"] == "abc"
    assert second["changes"] == {"operational": {"data.path": ["shards/toy", "http://h/toy"],
                                                 "data.retries": [5, 20]},
                                 "training": {"train.epochs": [2, 3]}}
    assert third["changes"]["training"] == {"data.path": ["http://h/toy", "shards/other"]}


def test_the_readme_lists_every_operational_key():
    readme = (REPO / "README.md").read_text()
    assert all(f"`{key}`" in readme for key in OPERATIONAL_KEYS)
