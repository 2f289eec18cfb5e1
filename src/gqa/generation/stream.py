"""Incremental detokenisation for streaming: turn token ids into printable text deltas."""

from __future__ import annotations

__all__ = ["TextStream"]


class TextStream:
    """Per-sequence text deltas from a tokenizer.

    Byte-level BPE may split one character over several tokens, so each push decodes the whole
    continuation and returns only the new, complete part (text ending in U+FFFD waits for more tokens).
    """

    def __init__(self, tokenizer, n_sequences: int = 1):
        self.tokenizer = tokenizer
        self.tokens: list[list[int]] = [[] for _ in range(n_sequences)]
        self.texts: list[str] = ["" for _ in range(n_sequences)]

    def push(self, index: int, token: int) -> str:
        """Add ``token`` to sequence ``index``; return the text it completes (maybe empty)."""
        self.tokens[index].append(token)
        text = self.tokenizer.decode(self.tokens[index], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.texts[index]) :] if text.startswith(self.texts[index]) else ""
        self.texts[index] = text
        return delta
