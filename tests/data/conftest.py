"""Shared fixtures for the data-loader tests."""

from __future__ import annotations

import pytest


class WhitespaceTokenizer:
    """One token per whitespace-separated word: enough where the real tokenizer is not the point."""

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


@pytest.fixture
def ws_tokenizer() -> WhitespaceTokenizer:
    return WhitespaceTokenizer()
