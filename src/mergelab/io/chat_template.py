"""``chat_template`` of a recipe: the output's chat template, so that chat models stay chat models.

mergekit's semantics (ALGORITHMS-2 13.12): unset keeps the tokenizer's own; ``auto`` takes the most
common template among the inputs (ties: the first in recipe order, where mergekit's order is not
deterministic); a short name picks a built-in template (alpaca, chatml, exaone, llama3, mistral);
anything else must be a Jinja string (containing "{", at least 20 characters). The template is
written as ``chat_template.jinja`` (what transformers 5 saves) and removed from
``tokenizer_config.json`` so that there is one source of truth.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

from mergelab.errors import MergelabError

TEMPLATE_FILE = "chat_template.jinja"

BUILTIN = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
               "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "alpaca": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
               "{{ message['content'] + '\\n\\n' }}{% elif message['role'] == 'user' %}"
               "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
               "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"),
    "mistral": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
                "{{ message['content'] + '\\n\\n' }}{% elif message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"),
    "exaone": ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
               "{{ '[|system|][|endofturn|]\\n' }}{% endif %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
               "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"),
}


def check_chat_template(value: object, where: str) -> str | None:
    """Validate a recipe's ``chat_template`` before any tensor is read."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise MergelabError(f"{where}: chat_template must be 'auto', a built-in name ({', '.join(BUILTIN)}) or a "
                            f"Jinja template string, got {value!r}")
    if value == "auto" or value in BUILTIN:
        return value
    if len(value) < 256 and "\n" not in value and "{" not in value:
        raise MergelabError(f"{where}: chat_template {value!r} is not a built-in template "
                            f"({', '.join(BUILTIN)}) nor a Jinja string")
    if "{" not in value or len(value) < 20:
        raise MergelabError(f"{where}: chat_template is not a valid Jinja template (needs '{{' and >= 20 characters)")
    try:
        import jinja2
        jinja2.Environment().parse(value)
    except ImportError:
        pass
    except jinja2.TemplateSyntaxError as e:
        raise MergelabError(f"{where}: chat_template: Jinja syntax error at line {e.lineno}: {e.message}") from None
    return value


def template_of(folder: Path) -> str | None:
    """The chat template a model folder's tokenizer carries (``chat_template.jinja`` or the config key)."""
    folder = Path(folder)
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8").strip() or None
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError):
        return None
    if isinstance(value, list):     # [{"name": ..., "template": ...}]: the default one
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    elif isinstance(value, dict):
        value = value.get("default")
    return value.strip() if isinstance(value, str) and value.strip() else None


def resolve_chat_template(value: str | None, model_folders: Sequence[Path | None]) -> str | None:
    """The template to write, or None to keep what the copied tokenizer files carry."""
    if value is None:
        return None
    if value == "auto":
        found = [t for t in (template_of(f) for f in model_folders if f is not None) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return BUILTIN.get(value, value)


def write_chat_template(folder: Path, template: str) -> None:
    folder = Path(folder)
    (folder / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except ValueError:
            return
        if isinstance(data, dict) and "chat_template" in data:
            del data["chat_template"]
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
