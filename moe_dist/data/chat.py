"""Supervised fine-tuning records: chats and prompt/completion pairs, rendered to text with the spans that carry
the loss.

A `.jsonl` line is either a chat, {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
with at least one assistant turn, or a pair, {"prompt": str, "completion": str}. A chat is rendered with the
tokenizer's chat template (the `chat_template` of a Hugging Face tokenizer_config.json beside tokenizer.json),
else with BUILTIN_TEMPLATE; the loss is taken on each assistant turn as the template renders it (its content
and end-of-turn text). A pair is prompt + completion + EOS, the loss on completion + EOS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moe_dist.data import DataError, one_line
from moe_dist.data.tokenizer import tokenizer_config

ROLES = ("system", "user", "assistant")
# One line of role marker per turn; the assistant's turn ends with the EOS token, which it learns to emit.
BUILTIN_TEMPLATE = ("{% for m in messages %}{{ '<|' + m.role + '|>\\n' + m.content }}"
                    "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


@dataclass
class Example:
    """One training example: its text and the [start, end) character spans whose tokens are targets."""

    text: str
    spans: list[tuple[int, int]]


def chat_template(tokenizer_path: Path) -> str | None:
    """The chat_template of the Hugging Face tokenizer_config.json beside `tokenizer_path`, if it has one."""
    template = tokenizer_config(tokenizer_path).get("chat_template")
    return template if isinstance(template, str) and template else None


class ChatRenderer:
    """Renders chats with a Jinja chat template as transformers' apply_chat_template does."""

    def __init__(self, template: str | None, bos_token: str, eos_token: str):
        self.source = "the tokenizer's chat template" if template else "the built-in chat template"
        # As transformers' apply_chat_template sets it up: block trimming and loop controls ({% break %}).
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = self._raise
        try:
            self.template = env.from_string(template or BUILTIN_TEMPLATE)
        except TemplateError as e:
            raise DataError(f"data: {self.source} does not compile ({one_line(e)})") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    @staticmethod
    def _raise(message: str) -> None:
        raise TemplateError(message)

    def render(self, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise DataError(f"data: {where}: {self.source} refused this chat ({one_line(e)})") from None

    def example(self, messages: list[dict], where: str) -> Example:
        """The whole chat, the loss on each assistant turn: the text between the prompt for it (the chat before
        it with the generation prompt) and the chat up to it."""
        text = self.render(messages, False, where)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], True, where)
            upto = self.render(messages[:i + 1], False, where)
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise DataError(f"data: {where}: {self.source} does not render this chat turn by turn (its earlier "
                                f"turns change with later ones), so the assistant turns cannot be found")
            spans.append((len(prompt), len(upto)))
        return Example(text, spans)


def _messages(record: dict, where: str) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"data: {where}: no \"messages\" list (a chat) or \"prompt\" and \"completion\" (a pair)")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"data: {where}: message {turn} has no string \"content\"")
        if message.get("role") not in ROLES:
            raise DataError(f"data: {where}: message {turn} has role {json.dumps(message.get('role'))} "
                            f"(roles: {', '.join(ROLES)})")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"data: {where}: no assistant turn, so nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def to_example(line: bytes, where: str, renderer: ChatRenderer) -> Example:
    """One jsonl line as an Example; DataError naming the file and line if it is not a chat or a pair."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"data: {where}: not valid JSON ({one_line(e)})") from None
    if not isinstance(record, dict):
        raise DataError(f"data: {where}: a JSON object was expected")
    if "messages" not in record and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        prompt, completion = record["prompt"], record["completion"] + renderer.eos_token
        return Example(prompt + completion, [(len(prompt), len(prompt) + len(completion))])
    return renderer.example(_messages(record, where), where)


def read_examples(path: Path, renderer: ChatRenderer, skip_bad: bool) -> Iterator[Example | None]:
    """Stream one .jsonl file's examples; a bad record is DataError, or None when `skip_bad` (to be counted)."""
    if path.suffix != ".jsonl":
        raise DataError(f"data: {path}: chat and prompt/completion data is .jsonl, one record a line")
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield to_example(line, f"{path}:{lineno}", renderer)
            except DataError:
                if not skip_bad:
                    raise
                yield None
