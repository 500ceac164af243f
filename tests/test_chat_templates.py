"""Every chat-template family ends a response with exactly one end-of-turn token, as the trainer tokenises it.

The templates are small stand-ins written here for the formats (ChatML, Zephyr, Gemma, Llama-3), put on copies of
the tiny model's tokenizer with their markers added as special tokens: nothing is downloaded.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer

from psipo_cli.data.pairs import load_pairs
from psipo_cli.recipe.schema import DataSection
from psipo_cli.tools.evaluate import tokenize_pairs
from tests.conftest import TINY_MODEL, write_jsonl

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ZEPHYR = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{{ m.content | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

LLAMA3_MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@dataclass(frozen=True)
class Family:
    template: str | None  # None: the shipped tiny-llama template
    end: str  # the end-of-turn marker a response must end with, once
    eos: str = "</s>"
    markers: tuple[str, ...] = ()  # special tokens the template writes


FAMILIES = {
    "tiny-llama": Family(None, "</s>"),
    "zephyr": Family(ZEPHYR, "</s>"),
    "chatml": Family(CHATML, "<|im_end|>", "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    # A base model's eos is not the turn marker: TRL would append it after <|im_end|>.
    "chatml-base": Family(CHATML, "<|im_end|>", "<|endoftext|>", ("<|im_start|>", "<|im_end|>", "<|endoftext|>")),
    "gemma": Family(GEMMA, "<end_of_turn>", "<eos>", ("<start_of_turn>", "<end_of_turn>", "<eos>")),
    "llama3": Family(LLAMA3, "<|eot_id|>", "<|eot_id|>", LLAMA3_MARKERS),
    "llama3-base": Family(LLAMA3, "<|eot_id|>", "<|end_of_text|>", (*LLAMA3_MARKERS, "<|end_of_text|>")),
}

# Multi-turn: the earlier assistant turn belongs to the prompt and keeps the template's marker and newline.
CHAT = {
    "prompt": [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2 plus 2?"},
    ],
    "chosen": [{"role": "assistant", "content": "It is 4."}],
    "rejected": [{"role": "assistant", "content": "It is 5."}],
}
PLAIN = {"prompt": "What is 2 plus 2?\nAnswer:", "chosen": " It is 4.", "rejected": " It is 5."}


def model_with_template(root: Path, family: Family) -> Path:
    """A copy of the tiny model whose tokenizer speaks `family`'s chat format."""
    root.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(TINY_MODEL / name, root / name)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    if family.template is not None:
        new = [AddedToken(m, special=True, normalized=False) for m in family.markers if m not in tokenizer.get_vocab()]
        tokenizer.add_tokens(new, special_tokens=True)
        tokenizer.eos_token = family.eos
        tokenizer.chat_template = family.template
    tokenizer.save_pretrained(root)
    return root


def _tokenizer(root: Path) -> Any:
    from psipo_cli.models.loading import load_tokenizer
    from psipo_cli.recipe.schema import ModelSection

    return load_tokenizer(ModelSection(name_or_path=str(root)))


def _token_rows(tmp_path: Path, tokenizer: Any, row: dict) -> dict:
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    section = DataSection.model_validate({"train": str(path), "max_length": 128})
    pairs = load_pairs(section.train, section, tokenizer, "train")
    return tokenize_pairs(pairs, tokenizer, 128)[0]


def _assert_ends_once(tokenizer: Any, ids: list[int], text: str, end: str) -> None:
    assert ids[-1] == tokenizer.convert_tokens_to_ids(end)
    # The whole completion, decoded: no second marker (EOS or the turn's own), no newline after it.
    assert tokenizer.decode(ids) == text + end


@pytest.mark.parametrize("name", FAMILIES)
def test_a_chat_response_ends_in_exactly_one_end_of_turn_token(tmp_path: Path, name: str) -> None:
    family = FAMILIES[name]
    tokenizer = _tokenizer(model_with_template(tmp_path / "model", family))
    row = _token_rows(tmp_path, tokenizer, CHAT)
    _assert_ends_once(tokenizer, row["chosen_ids"], "It is 4.", family.end)
    _assert_ends_once(tokenizer, row["rejected_ids"], "It is 5.", family.end)
    assert "Hello." in tokenizer.decode(row["prompt_ids"])


@pytest.mark.parametrize("name", FAMILIES)
def test_sampling_stops_on_eos_and_on_the_turn_marker(tmp_path: Path, name: str) -> None:
    from psipo_cli.data.chat import stop_token_ids

    family = FAMILIES[name]
    tokenizer = _tokenizer(model_with_template(tmp_path / "model", family))
    expected = {tokenizer.convert_tokens_to_ids(t) for t in (family.eos, family.end)}
    assert set(stop_token_ids(tokenizer)) == expected


@pytest.mark.parametrize("name", ["tiny-llama", "gemma"])
def test_plain_text_responses_end_with_one_eos(tmp_path: Path, name: str) -> None:
    family = FAMILIES[name]
    tokenizer = _tokenizer(model_with_template(tmp_path / "model", family))
    row = _token_rows(tmp_path, tokenizer, PLAIN)
    _assert_ends_once(tokenizer, row["chosen_ids"], " It is 4.", family.eos)
    row = _token_rows(tmp_path, tokenizer, {**PLAIN, "chosen": " It is 4." + family.eos})
    _assert_ends_once(tokenizer, row["chosen_ids"], " It is 4.", family.eos)  # an EOS already there is not doubled


@pytest.mark.slow
@pytest.mark.parametrize(("name", "row"), [("gemma", CHAT), ("chatml-base", CHAT), ("chatml-base", PLAIN)])
def test_the_trainer_tokenises_one_end_marker_per_response(write_recipe, tmp_path: Path, name: str, row) -> None:
    from psipo_cli.recipe.loader import load_recipe
    from psipo_cli.training.finetune import build_trainer, prepare

    family = FAMILIES[name]
    model = model_with_template(tmp_path / "model", family)
    data = write_jsonl(tmp_path / "d.jsonl", [row])
    recipe = load_recipe(write_recipe(model={"name_or_path": str(model)}, data={"train": str(data)}))
    prepared = prepare(recipe)
    example = build_trainer(prepared).train_dataset[0]
    text, end = ("It is 4.", family.end) if row is CHAT else (row["chosen"], family.eos)
    _assert_ends_once(prepared.tokenizer, example["chosen_ids"], text, end)
