"""Fakes that several test modules share (unit tests only: integration tests use the real services)."""

from __future__ import annotations


class EmptyRegistry:
    """A model source whose registry has no champion: serving runs, predictions are empty, the webhook and
    the dashboard work. Subclasses override ``current_version`` to model an outage."""

    def __init__(self, model_name: str = "labelloop-test"):
        self.model_name = model_name

    def current_version(self) -> int | None:
        return None

    def aliases(self) -> dict[str, int]:
        return {}

    def versions(self) -> list[int]:
        return []

    def check_texts(self, limit: int) -> list[str]:
        return []
