"""Conversations (``messages``: a list of ``{"role", "content"}``) rendered with the tokenizer's chat
template, with labels on the assistant turns only.

A conversation is rendered turn by turn: the text before each assistant turn is the template applied
to the messages so far with ``add_generation_prompt=True``; the assistant turn is what the template
adds for that message (its content and end-of-turn marker). Only the assistant spans carry labels, as
TRL's ``assistant_only_loss`` does, without needing ``{% generation %}`` markers in the template.
"""

from __future__ import annotations

import json

from ds_loradrop.errors import UsageError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages, where: str) -> list[dict]:
    """``messages`` if it is a list of ``{"role", "content"}`` with at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UsageError(f"{where}: messages[{i}] needs a string 'content'")
        if message.get("role") not in ROLES:
            raise UsageError(
                f"{where}: messages[{i}] has role {message.get('role')!r}; expected one of {ROLES}"
            )
    if not any(message["role"] == "assistant" for message in messages):
        raise UsageError(f"{where}: the conversation has no assistant turn to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def split_last_turn(messages: list[dict]) -> tuple[list[dict], str]:
    """(the messages before the last assistant turn, that turn's content): what is evaluated."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def encode_json(messages: list[dict]) -> str:
    """One canonical string per conversation (dataset column, held-out matching)."""
    return json.dumps(messages, ensure_ascii=False, sort_keys=True)


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            "chat 'messages' data needs a tokenizer with a chat template; this model's tokenizer has none "
            "(use an instruct model, or the prompt/completion format)"
        )


def render_generation_prompt(tokenizer, messages: list[dict]) -> str:
    """The text a model continues to answer after ``messages``."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a whole conversation, labels only on assistant turns."""
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""

    def add(text: str, learn: bool) -> None:
        nonlocal rendered
        ids = tokenizer(continuation(rendered, text), add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if learn else [IGNORE_INDEX] * len(ids))
        rendered = text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            add(render_generation_prompt(tokenizer, messages[:i]), learn=False)
        add(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False), message["role"] == "assistant")
    return input_ids, labels


def continuation(rendered: str, text: str) -> str:
    """What ``text`` adds to ``rendered`` (the template must render a conversation as a prefix of it)."""
    if not text.startswith(rendered):
        raise UsageError(
            "the chat template does not render a conversation as a prefix of its continuation; it cannot "
            "be trained turn by turn"
        )
    return text[len(rendered) :]
