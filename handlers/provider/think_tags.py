"""Separate a leading thinking block (``<think>…</think>`` and its cousins) from streamed content.

Models served without a reasoning parser (a raw DeepSeek-R1, QwQ or Seed-OSS
behind a plain vLLM, SGLang, llama.cpp or Ollama) put their reasoning inside
the content, between tags that vary by model family: :data:`THINK_TAGS` lists
them. Tags can be split across deltas in any way, so text that might be the
start of a tag is held back until the next delta decides it, and a tag never
leaks into the answer.

Models whose chat template opens the block in the prompt (DeepSeek-R1's 2025
template, QwQ, Qwen3 Thinking-2507, MiniMax-M2…) send only the closing tag;
for them the mode ``"open"`` reads everything before ``</think>`` as
reasoning. It is a per-model setting, never a guess: a model with thinking
off would otherwise have its whole answer filed as reasoning.
"""

from __future__ import annotations

from typing import Final

__all__ = ["THINK_MODES", "THINK_TAGS", "ThinkSplitter", "ThinkTags"]


class ThinkTags:
    """One row of the table: the opening tag, the tags that can close it, and glue to drop after it."""

    __slots__ = ("close", "open", "then")

    def __init__(self, open: str, *close: str, then: str = "") -> None:
        self.open = open
        self.close = close
        # Markup some formats put between the closing tag and the answer.
        self.then = then

    def __repr__(self) -> str:
        return f"ThinkTags({self.open!r}, {', '.join(map(repr, self.close))}, then={self.then!r})"


# Recognised only at the very start of the content (after optional whitespace). To support
# another spelling, add a row; the tests run every row through every split.
THINK_TAGS: Final = (
    ThinkTags("<think>", "</think>"),  # DeepSeek-R1, QwQ, Qwen3, MiniMax-M2…
    ThinkTags("<thinking>", "</thinking>"),  # gateways that fold reasoning into content
    ThinkTags("<reasoning>", "</reasoning>"),
    ThinkTags("<reason>", "</reason>"),
    ThinkTags("<thought>", "</thought>"),
    ThinkTags("<|begin_of_thought|>", "<|end_of_thought|>", then="<|begin_of_solution|>"),  # Sky-T1 style
    ThinkTags("◁think▷", "◁/think▷"),  # Kimi
    ThinkTags("<seed:think>", "</seed:think>"),  # ByteDance Seed-OSS
    ThinkTags("[THINK]", "[/THINK]"),  # Magistral served as GGUF
    # gpt-oss "harmony" with its special tokens kept. The analysis message ends with <|end|>,
    # and the final one follows; a server that drops <|end|> still sends the final channel's header.
    ThinkTags(
        "<|channel|>analysis<|message|>",
        "<|end|>",
        "<|channel|>final<|message|>",
        then="<|start|>assistant<|channel|>final<|message|>",
    ),
)

# How a model's content is read for a thinking block:
#   auto: a block opened by one of THINK_TAGS at the start is reasoning;
#   open: the prompt opened <think>, so everything up to </think> is reasoning;
#   none: the content is only answer, even if it starts with a tag.
THINK_MODES: Final = ("auto", "open", "none")

_OPENERS = tuple(tags.open for tags in THINK_TAGS)
# Every proper prefix of an opening tag, "" included: text that is still undecided.
_UNDECIDED = frozenset(tags.open[:size] for tags in THINK_TAGS for size in range(len(tags.open)))
# What a template that opens the block in the prompt leaves for the output to close.
_PROMPT_OPENED = THINK_TAGS[0]

_START, _THINKING, _AFTER, _ANSWER = range(4)


class ThinkSplitter:
    """Feed content deltas; get back ``(reasoning, content)`` text pairs."""

    __slots__ = ("_held", "_open_mode", "_state", "_tags", "_then")

    def __init__(self, mode: str = "auto") -> None:
        if mode not in THINK_MODES:
            raise ValueError(f"think mode must be one of {', '.join(THINK_MODES)}, not {mode!r}")
        # Once the answer has begun, feed() returns at its first line: plain content pays one comparison.
        self._state = _ANSWER if mode == "none" else _START
        self._open_mode = mode == "open"
        self._held = ""
        self._tags = _PROMPT_OPENED
        self._then = ""

    def feed(self, text: str) -> tuple[str, str]:
        """Return the reasoning and answer text this delta makes certain."""
        if self._state == _ANSWER:
            return "", text
        text = self._held + text
        self._held = ""
        reasoning = ""
        if self._state == _START:
            stripped = text.lstrip()
            if stripped.startswith(_OPENERS):
                tags = _opened_by(stripped)
                self._enter(tags)
                text = stripped[len(tags.open) :]
            elif stripped in _UNDECIDED:
                # Only whitespace or part of an opening tag so far.
                self._held = text
                return "", ""
            elif self._open_mode:
                self._enter(_PROMPT_OPENED)
            else:
                self._state = _ANSWER
                return "", text
        if self._state == _THINKING:
            closes = self._tags.close
            end, size = _find_any(text, closes)
            if size == 0:
                keep = _partial_suffix(text, closes)
                if keep:
                    self._held = text[-keep:]
                    text = text[:-keep]
                return text, ""
            reasoning = text[:end]
            self._state = _AFTER
            text = text[end + size :]
        # Any format's glue and the blank lines between the closing tag and the answer, whose first
        # line keeps its indentation (an indented code block): whitespace alone waits for what follows.
        then = self._then
        if then:
            stripped = text.lstrip()
            if stripped.startswith(then):
                text = stripped[len(then) :]
                self._then = ""
            elif then.startswith(stripped):
                self._held = text
                return reasoning, ""
            else:
                self._then = ""
        if not text.strip():
            self._held = text
            return reasoning, ""
        self._state = _ANSWER
        return reasoning, text[_blank_lines(text) :]

    def close(self) -> tuple[str, str]:
        """End of stream: release whatever was held back."""
        held, self._held = self._held, ""
        if self._state == _THINKING or (self._state == _START and self._open_mode):
            return held, ""
        if self._state == _AFTER:
            # Blank lines after the reasoning, perhaps with the start of a format's glue.
            return "", held[_blank_lines(held) :] if held.strip() else ""
        return "", held

    def _enter(self, tags: ThinkTags) -> None:
        self._state = _THINKING
        self._tags = tags
        self._then = tags.then


def _blank_lines(text: str) -> int:
    """Length of the whitespace at the start of ``text`` up to its last line break (all of it, when it has none)."""
    run = len(text) - len(text.lstrip())
    newline = text.rfind("\n", 0, run)
    return newline + 1 if newline >= 0 else run


def _opened_by(text: str) -> ThinkTags:
    """The row whose opening tag ``text`` starts with (it starts with one)."""
    for tags in THINK_TAGS:
        if text.startswith(tags.open):
            return tags
    raise AssertionError(f"no opening tag at the start of {text[:40]!r}")


def _find_any(text: str, tags: tuple[str, ...]) -> tuple[int, int]:
    """Where the first of ``tags`` starts in ``text``, and its length (0: none there)."""
    if len(tags) == 1:
        tag = tags[0]
        at = text.find(tag)
        return (at, len(tag)) if at >= 0 else (-1, 0)
    found = (-1, 0)
    for tag in tags:
        at = text.find(tag)
        if at >= 0 and (found[1] == 0 or at < found[0]):
            found = (at, len(tag))
    return found


def _partial_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``tags``."""
    longest = 0
    for tag in tags:
        for size in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:size]):
                longest = size
                break
    return longest
