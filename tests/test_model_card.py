"""Every merge output carries a model card with hub front-matter, and the recipe's chat template."""

from __future__ import annotations

import json

import pytest
import yaml

from mergelab import merge
from mergelab.errors import MergelabError
from mergelab.io.chat_template import BUILTIN, template_of
from mergelab.io.model_card import read_front_matter

from tests.helpers import make_model_folders, write_recipe

JINJA = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_model_folders(tmp_path_factory.mktemp("card"), n=2)


def _tokenizer(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def test_merge_writes_a_card_with_front_matter_and_the_resolved_recipe(models, tmp_path):
    base, fts = models
    recipe = write_recipe(tmp_path / "r.yaml", base, fts, "ties", {"density": 0.3})
    merge(recipe, tmp_path / "out")
    front = read_front_matter(tmp_path / "out")
    assert front["base_model"] == ["base", "ft1", "ft2"]
    assert front["library_name"] == "transformers" and "merge" in front["tags"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "the **ties** merge using base as the base" in card
    body = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(body)["resolved_parameters"]["density"] == 0.3


@pytest.mark.parametrize("value, expected", [("chatml", BUILTIN["chatml"]), (JINJA, JINJA)])
def test_chat_template_by_name_or_jinja_is_written_and_works(models, tmp_path, value, expected):
    base, fts = models
    recipe = write_recipe(tmp_path / "r.yaml", base, fts, "task_arithmetic", chat_template=value)
    merge(recipe, tmp_path / "out")
    assert template_of(tmp_path / "out") == expected.strip()
    tok = _tokenizer(tmp_path / "out")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "hi" in text and ("<|im_start|>user" in text if value == "chatml" else "<user>hi</user>" in text)


def test_auto_takes_the_most_common_template_of_the_inputs(models, tmp_path):
    base, fts = models
    import shutil
    copies = []
    for i, src in enumerate([base, *fts]):
        dst = tmp_path / f"m{i}"
        shutil.copytree(src, dst)
        template = JINJA if i else BUILTIN["llama3"]        # two inputs carry JINJA, the base llama3
        (dst / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        copies.append(dst)
    recipe = write_recipe(tmp_path / "r.yaml", copies[0], copies[1:], "task_arithmetic", chat_template="auto")
    merge(recipe, tmp_path / "out")
    assert template_of(tmp_path / "out") == JINJA
    assert "chat_template" not in json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("value, message", [("chatmlx", "is not a built-in template"),
                                            ("{{ x }}", "needs '{' and >= 20 characters"),
                                            ("{% for m in messages %}{{ m }", "Jinja syntax error"),
                                            (3, "chat_template must be")])
def test_bad_chat_templates_are_refused_before_merging(models, tmp_path, value, message):
    base, fts = models
    recipe = write_recipe(tmp_path / "r.yaml", base, fts, "task_arithmetic", chat_template=value)
    with pytest.raises(MergelabError) as e:
        merge(recipe, tmp_path / "out")
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()
