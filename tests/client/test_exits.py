"""Tests for L{sockd.client.exits}: one table, the one the help texts give."""

from __future__ import annotations

from sockd.client import exits, fileproto
from sockd.client.files import EPILOG


def test_one_table_of_distinct_statuses() -> None:
    values = [getattr(exits, name) for name in exits.__all__]
    assert len(set(values)) == len(values)
    # The file protocol's names are the same objects, not a second table.
    for name in exits.__all__:
        assert getattr(fileproto, name) is getattr(exits, name)


def test_the_file_clients_help_lists_each_status() -> None:
    for name in exits.__all__:
        if name != "EXIT_OK":
            assert f"  {getattr(exits, name)} " in EPILOG, name
