"""Supervised fine-tuning records: chats and prompt/completion pairs, rendered to text with the spans that carry
the loss.

A `.jsonl` line is either a chat, {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
with at least one assistant turn, or a pair, {"prompt": str, "completion": str}. A chat is rendered with the
tokenizer's chat template (the `chat_template` of a Hugging Face tokenizer_config.json beside tokenizer.json),
else with BUILTIN_TEMPLATE; the loss is taken on each assistant turn as the template renders it (its content
and end-of-turn text). A pair is prompt + completion + EOS, the loss on completion + EOS.

Each answer is found by rendering the chat up to it, which also checks that the template renders the chat turn
by turn (earlier turns unchanged by later ones). That is two renderings per answer, quadratic in the turns, so
beyond EXACT_ANSWERS answers a chat is rendered once, noting how much text there was when the template's loop
over the messages fetched each one, which is where the turn before it ends; there the first and last answers
are checked against the chat rendered up to them, and where they disagree (a template that looks ahead or
buffers its output), every answer is found turn by turn after all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moe_dist.data import DataError, one_line
from moe_dist.data.documents import unicode_text
from moe_dist.data.tokenizer import tokenizer_config

ROLES = ("system", "user", "assistant")
EXACT_ANSWERS = 32  # up to this many answers, a chat costs at most 65 renderings: check every turn
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

    def render(self, messages: list[dict], add_generation_prompt: bool, where: str,
               starts: dict[int, int] | None = None) -> str:
        """The chat as text; with `starts`, filled with {i: characters rendered when message i was fetched} and
        {len(messages): the characters when the loop ended} (see _NotedMessages)."""
        notes = _Notes(starts) if starts is not None else None
        parts = []
        try:
            for part in self.template.generate(
                    messages=messages if notes is None else _NotedMessages(messages, range(len(messages)), notes),
                    add_generation_prompt=add_generation_prompt, bos_token=self.bos_token, eos_token=self.eos_token):
                parts.append(part)
                if notes is not None:
                    notes.rendered += len(part)
        except Exception as e:  # a template is a program: besides raise_exception, anything ({{ 1 // 0 }})
            detail = one_line(e) if isinstance(e, TemplateError) else f"{type(e).__name__}: {one_line(e)}"
            raise DataError(f"data: {where}: {self.source} refused this chat ({detail})") from None
        return "".join(parts)

    def _span(self, messages: list[dict], i: int, text: str, where: str) -> tuple[int, int]:
        """Answer i's span: the text between the prompt for it (the chat before it with the generation prompt)
        and the chat up to it."""
        prompt = self.render(messages[:i], True, where)
        upto = self.render(messages[:i + 1], False, where)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise DataError(f"data: {where}: {self.source} does not render this chat turn by turn (its earlier "
                            f"turns change with later ones), so the assistant turns cannot be found")
        return len(prompt), len(upto)

    def example(self, messages: list[dict], where: str) -> Example:
        """The whole chat, the loss on each assistant turn (its _span; see the module's doc)."""
        starts: dict[int, int] = {}
        text = self.render(messages, False, where, starts)
        answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        if len(answers) <= EXACT_ANSWERS:
            return Example(text, [self._span(messages, i, text, where) for i in answers])
        first, last = answers[0], answers[-1]
        exact = {i: self._span(messages, i, text, where) for i in {first, last}}
        spans = []
        if all(i in starts and i + 1 in starts for i in answers):
            generation_prompt = exact[first][0] - starts[first]
            spans = [(starts[i] + generation_prompt, starts[i + 1]) for i in answers]
        if not spans or spans[0] != exact[first] or spans[-1] != exact[last]:
            spans = [self._span(messages, i, text, where) for i in answers]
        return Example(text, spans)


@dataclass
class _Notes:
    starts: dict[int, int]  # message index -> characters rendered when the template fetched it
    rendered: int = 0  # characters the template has output so far


class _NotedMessages(list):
    """Messages that note, as a template's loop fetches each one, how much text has been rendered: where the turn
    before it ends. A slice notes too (templates loop over messages[1:] after a system message); a later loop
    notes over an earlier one (a look-back over the chat before the rendering loop)."""

    def __init__(self, messages: list[dict], indices: range, notes: _Notes):
        super().__init__(messages)
        self._indices, self._notes = indices, notes  # underscored: the sandbox keeps templates from reading them

    def __iter__(self) -> Iterator[dict]:
        for i, message in zip(self._indices, super().__iter__()):
            self._notes.starts[i] = self._notes.rendered
            yield message
        if self._indices and self._indices.step > 0:  # the loop asked past its last message
            self._notes.starts[self._indices[-1] + 1] = self._notes.rendered

    def __getitem__(self, key: int | slice) -> dict | _NotedMessages:
        item = super().__getitem__(key)
        return _NotedMessages(item, self._indices[key], self._notes) if isinstance(key, slice) else item


def _messages(record: dict, where: str) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"data: {where}: no \"messages\" list (a chat) or \"prompt\" and \"completion\" (a pair)")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"data: {where}: message {turn} has no string \"content\"")
        unicode_text(message["content"], where, f"message {turn}'s content")
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
        prompt, completion = (unicode_text(record[key], where, json.dumps(key)) for key in ("prompt", "completion"))
        completion += renderer.eos_token
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
