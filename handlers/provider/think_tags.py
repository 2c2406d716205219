"""Separate a leading ``<think>…</think>`` block from streamed content.

Models served without a reasoning parser (a raw DeepSeek-R1 or QwQ behind a
plain vLLM, llama.cpp or Ollama) put their reasoning inside the content. The
tags can be split across deltas in any way, so text that might be the start
of a tag is held back until the next delta decides it, and a tag never leaks
into the answer.
"""

from __future__ import annotations

__all__ = ["ThinkSplitter"]

OPEN = "<think>"
CLOSE = "</think>"

_START, _THINKING, _ANSWER_START, _ANSWER = range(4)


class ThinkSplitter:
    """Feed content deltas; get back ``(reasoning, content)`` text pairs."""

    __slots__ = ("_held", "_state")

    def __init__(self) -> None:
        self._state = _START
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """Return the reasoning and answer text this delta makes certain."""
        if self._state == _ANSWER:
            return "", text
        text = self._held + text
        self._held = ""
        reasoning = ""
        if self._state == _START:
            stripped = text.lstrip()
            if stripped.startswith(OPEN):
                self._state = _THINKING
                text = stripped[len(OPEN) :]
            elif OPEN.startswith(stripped):
                # Only whitespace or part of "<think>" so far: undecided.
                self._held = text
                return "", ""
            else:
                self._state = _ANSWER
                return "", text
        if self._state == _THINKING:
            before, found, after = text.partition(CLOSE)
            if not found:
                keep = _partial_suffix(text, CLOSE)
                if keep:
                    self._held = text[-keep:]
                    text = text[:-keep]
                return text, ""
            reasoning = before
            self._state = _ANSWER_START
            text = after
        # The blank lines models put between "</think>" and the answer.
        text = text.lstrip()
        if text:
            self._state = _ANSWER
        return reasoning, text

    def close(self) -> tuple[str, str]:
        """End of stream: release whatever was held back."""
        held, self._held = self._held, ""
        if self._state == _THINKING:
            return held, ""
        if self._state == _START:
            return "", held
        return "", ""


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
