"""How a response's text ends: chat-template rendering and the one end marker every response carries.

A model learns to stop by seeing its stop token at the end of each response, once. Plain-text responses end
with the tokenizer's EOS. Rendered chat responses end with the template's own end-of-turn token (`</s>`,
`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`), which is what chat models stop on; whitespace the template writes
after it (ChatML's and Gemma's newline) is context for the next turn, not something the model emits, so it goes.
Because every response already ends with its marker, TRL's own add-EOS step must add nothing (`ENDS_MARKED`):
it would otherwise put EOS after a turn marker that is not EOS (Gemma, Qwen and Llama-3 base tokenizers).
"""

from __future__ import annotations

from typing import Any


class _EndsMarked:
    """Stands in for the tokenizer in TRL's add-EOS step (`DPOTrainer._prepare_dataset`): that step appends
    `eos_token` unless the text already ends with it, and every text ends with the empty string."""

    eos_token = ""


ENDS_MARKED = _EndsMarked()


def end_with_eos(text: str, tokenizer: Any) -> str:
    """`text` ending with the tokenizer's EOS exactly once (what TRL does to plain text)."""
    eos = tokenizer.eos_token
    return text if eos is None or text.endswith(eos) else text + eos


def _special_tokens(tokenizer: Any) -> set[str]:
    # Turn markers are often added tokens flagged special without being one of the named special tokens.
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return {t.content for t in added.values() if t.special} | set(tokenizer.all_special_tokens)


class ChatRenderer:
    """Render conversational rows to text with the tokenizer's chat template, checking the prompt is a prefix."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # If the tokenizer adds BOS itself, a BOS written by the template would be doubled: strip it.
        bos = tokenizer.bos_token
        adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        self.strip = bos if adds_bos else None
        self.markers = {m for m in _special_tokens(tokenizer) if m}

    def __call__(self, prompt: Any, response: Any) -> tuple[str, str]:
        prompt = self._messages(prompt, "user")
        head = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = self.tokenizer.apply_chat_template(prompt + self._messages(response, "assistant"), tokenize=False)
        if not full.startswith(head):
            raise ValueError("the chat template does not render the prompt as a prefix of prompt+response")
        if self.strip and head.startswith(self.strip):
            head, full = head[len(self.strip) :], full[len(self.strip) :]
        return head, self.end_turn(full[len(head) :])

    def prompt(self, prompt: Any) -> str:
        """The prompt alone, as `__call__` renders it before a response: what a sampled response continues."""
        head = self.tokenizer.apply_chat_template(
            self._messages(prompt, "user"), add_generation_prompt=True, tokenize=False
        )
        return head[len(self.strip) :] if self.strip and head.startswith(self.strip) else head

    def _messages(self, value: Any, role: str) -> list[dict[str, Any]]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("conversational rows need a tokenizer with a chat template")
        return [{"role": role, "content": value}] if isinstance(value, str) else value

    def end_turn(self, response: str) -> str:
        """The rendered response ending at its end-of-turn token, or with EOS if the template writes none."""
        trimmed = response.rstrip()
        if any(trimmed.endswith(marker) for marker in self.markers):
            return trimmed
        return end_with_eos(response, self.tokenizer)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids a response ends with: EOS, and the chat template's end-of-turn token when it has another one.

    Sampling must stop on both: a chat-trained policy ends its turn with the template's marker (see the module
    docstring), which for Gemma or a Qwen base tokenizer is not EOS.
    """
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if getattr(tokenizer, "chat_template", None) is None:
        return ids
    render = ChatRenderer(tokenizer)
    try:
        _, response = render([{"role": "user", "content": "x"}], [{"role": "assistant", "content": "y"}])
    except Exception:  # a template that cannot render a minimal turn says nothing about its end marker
        return ids
    ends = [m for m in render.markers if response.endswith(m)]
    marker = tokenizer.convert_tokens_to_ids(max(ends, key=len)) if ends else None
    return [*ids, marker] if isinstance(marker, int) and marker not in ids else ids


def up_to_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """A sampled response up to and including its first stop token (what generate writes after it is padding)."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[: i + 1]
    return ids
