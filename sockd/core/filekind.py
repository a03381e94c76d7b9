"""
What a file is, for the messages refusing anything but a regular file (a
FIFO or a device would block the reader).  A leaf: the configuration, the
endpoints and the client all use it.
"""

from __future__ import annotations

import stat

__all__ = ["file_kind"]


def file_kind(mode: int) -> str:
    """What a file of this C{st_mode} is, for messages: C{a FIFO}..."""
    kinds = [
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ]
    return next((what for test, what in kinds if test(mode)), "not a regular file")
