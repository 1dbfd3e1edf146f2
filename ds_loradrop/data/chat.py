"""Conversations (``messages``: a list of ``{"role", "content"}``) rendered with the tokenizer's chat
template, with labels on the assistant turns only.

Each assistant turn's span in the rendered text is found by rendering the conversation so far: the text
before it is the template applied to the earlier messages with ``add_generation_prompt=True``; the turn
is what the template adds for that message (its content and end-of-turn marker). Only tokens in those
spans carry labels, as TRL's ``assistant_only_loss`` does, without needing ``{% generation %}`` markers
in the template.
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
    if messages[0]["role"] == "assistant":
        raise UsageError(f"{where}: the conversation starts with an assistant turn (nothing it answers)")
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


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the conversation rendered with the chat template, the character span of each assistant turn in
    it): what the template adds for that message after the generation prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before = render_generation_prompt(tokenizer, messages[:i]) if i else ""
            after = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            continuation(before, after)
            continuation(after, text)
            spans.append((len(before), len(after)))
    return text, spans


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a whole conversation, labels only on assistant turns.

    The whole rendering is tokenised once (so pieces that join across turn boundaries, e.g.
    SentencePiece's leading-space marker, are the tokenizer's own), and a token is labelled when its
    characters overlap an assistant span (offsets of a fast tokenizer)."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [
        token
        if any(start < end_span and end > start_span for start_span, end_span in spans)
        else IGNORE_INDEX
        for token, (start, end) in zip(input_ids, encoded["offset_mapping"])
    ]
    return input_ids, labels


def continuation(rendered: str, text: str) -> str:
    """What ``text`` adds to ``rendered`` (the template must render a conversation as a prefix of it)."""
    if not text.startswith(rendered):
        raise UsageError(
            "the chat template does not render a conversation as a prefix of its continuation; its "
            "assistant turns cannot be told apart"
        )
    return text[len(rendered) :]
