"""pytest configuration shared by every test module."""

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Integration tests start processes: run them after the in-memory ones.
    items.sort(key=lambda item: "integration" in item.keywords)
