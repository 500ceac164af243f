"""`psipo generate` and `psipo chat`: a finished run's policy, or its reference, answering prompts.

`Generator` opens the run and renders conversations as training did (the chat template, BOS not doubled);
`generate_completions` answers single prompts in batches, `chat_loop` a conversation line by line.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from psipo_cli.data.chat import ChatRenderer
from psipo_cli.errors import UserError
from psipo_cli.models.loading import (
    describe_reference,
    load_policy,
    load_reference,
    load_tokenizer,
    quiet_loading,
    to_inference_device,
)
from psipo_cli.run.directory import resolve_run


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.7  # 0: greedy decoding
    seed: int | None = None  # set once before the first prompt, so a whole session is reproducible


class Generator:
    """A finished run's policy, or with `reference=True` its reference policy, answering conversations.

    The reference is the base with the adapter disabled, or, for a run started from an existing adapter
    (`adapter.init_from`), that starting adapter: the model the run's margins were measured against.
    """

    def __init__(self, target: Path, reference: bool = False, raw: bool = False) -> None:
        self.recipe, self.run_dir = resolve_run(target)
        if self.recipe.objective.loss == "reward":
            raise UserError(
                "a reward model scores text, it does not generate; use `psipo label` with it", where=str(target)
            )
        self.tokenizer = load_tokenizer(self.recipe.model)
        self.reference = reference
        self.use_template = not raw and getattr(self.tokenizer, "chat_template", None) is not None
        self._strip_bos = ChatRenderer(self.tokenizer).strip
        with quiet_loading(self.run_dir):
            self.model = to_inference_device(load_policy(self.recipe, self.run_dir), self.recipe.model)
            self._as_reference = load_reference(self.model, self.recipe) if reference else None

    @property
    def context_length(self) -> int:
        limits = [getattr(self.model.config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        return min(limit for limit in limits if isinstance(limit, int) and 0 < limit < 10**9) if any(limits) else 2048

    def describe(self) -> str:
        who = "reference policy" if self.reference else "trained policy"
        ref = describe_reference(self.recipe).split(" (")[0]
        what = f" = {ref}" if self.reference else f" (adapter in {self.run_dir})"
        mode = "chat template" if self.use_template else "plain text"
        return f"{who}{what}; prompts as {mode}"

    def render(self, messages: list[dict[str, str]]) -> str:
        """The text the model continues: the chat template with a generation prompt, or the turns joined."""
        if not self.use_template:
            return "\n".join(message["content"] for message in messages)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # As in training (chat.ChatRenderer): the tokenizer adds BOS itself, so a BOS written by the template goes.
        return text[len(self._strip_bos) :] if self._strip_bos and text.startswith(self._strip_bos) else text

    def room(self, max_new_tokens: int) -> int:
        """Most prompt tokens that fit in the context beside `max_new_tokens` new ones."""
        room = self.context_length - max_new_tokens
        if room < 1:
            raise UserError(
                f"leaves no room for the prompt in the model's {self.context_length}-token context",
                where=f"--max-new-tokens {max_new_tokens}",
            )
        return room

    def encode(self, messages: list[dict[str, str]], max_new_tokens: int) -> torch.Tensor:
        """Token ids (1, n) of the conversation; the oldest exchanges, then the oldest tokens, go if it is too long."""
        room = self.room(max_new_tokens)
        ids = self.tokenizer(self.render(messages), return_tensors="pt")["input_ids"]
        while ids.shape[1] > room and len(messages) > 2:
            messages = messages[2:]  # drop the oldest user/assistant exchange
            ids = self.tokenizer(self.render(messages), return_tensors="pt")["input_ids"]
        return ids[:, -room:]

    def reply(self, messages: list[dict[str, str]], sampling: Sampling) -> str:
        return self.replies([messages], sampling)[0]

    @torch.no_grad()
    def replies(self, conversations: list[list[dict[str, str]]], sampling: Sampling) -> list[str]:
        """One reply to each conversation, generated together: prompts left-padded so every reply starts at the
        same position."""
        encoded = [self.encode(messages, sampling.max_new_tokens)[0] for messages in conversations]
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.stack([torch.nn.functional.pad(i, (width - len(i), 0), value=pad) for i in encoded])
        mask = torch.stack([torch.arange(width) >= width - len(i) for i in encoded]).long()
        sample = sampling.temperature > 0
        options: dict[str, Any] = {"do_sample": sample, "max_new_tokens": sampling.max_new_tokens}
        if sample:
            options["temperature"] = sampling.temperature
        with self._active():
            out = self.model.generate(
                input_ids=ids.to(self.model.device),
                attention_mask=mask.to(self.model.device),
                pad_token_id=pad,
                **options,
            )
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]

    def _active(self) -> contextlib.AbstractContextManager[Any]:
        """The reference's context around each generate call, or none for the trained policy."""
        return self._as_reference() if self._as_reference is not None else contextlib.nullcontext()


def open_generator(target: Path, sampling: Sampling, reference: bool = False, raw: bool = False) -> Generator:
    """A Generator, with `sampling` checked against its context before anything is generated."""
    generator = Generator(target, reference, raw)
    generator.room(sampling.max_new_tokens)
    return generator


def seed_sampling(seed: int | None) -> None:
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)


def generate_completions(
    generator: Generator, prompts: list[str], sampling: Sampling, batch_size: int = 16
) -> list[str]:
    """One completion per prompt, each prompt a single user turn, `batch_size` prompts per generate call."""
    seed_sampling(sampling.seed)
    turns = [[{"role": "user", "content": prompt}] for prompt in prompts]
    batches = (turns[start : start + batch_size] for start in range(0, len(turns), batch_size))
    return [reply for batch in batches for reply in generator.replies(batch, sampling)]


def chat_loop(
    generator: Generator, read_line: Callable[[], str | None], write: Callable[[str], None], sampling: Sampling
) -> int:
    """Answer lines until EOF (`read_line` returns None) or '/exit'; '/reset' forgets the conversation so far.

    Each reply is written as one `assistant> ...` block. Returns the number of replies.
    """
    seed_sampling(sampling.seed)
    history: list[dict[str, str]] = []
    replies = 0
    while (line := read_line()) is not None:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history = []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        answer = generator.reply(history, sampling)
        history.append({"role": "assistant", "content": answer})
        write(f"assistant> {answer}")
        replies += 1
    return replies


def stdin_reader() -> Callable[[], str | None]:
    """Lines from stdin: with a `you> ` prompt (and line editing) at a terminal, plain lines from a pipe."""
    interactive = sys.stdin.isatty()

    def read() -> str | None:
        try:
            return input("you> ") if interactive else _readline()
        except EOFError:
            return None

    return read


def _readline() -> str | None:
    line = sys.stdin.readline()
    return line if line else None
