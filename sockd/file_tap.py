"""C{twistd sockd-file}: not yet configured in this release."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from sockd.config import Config
from sockd.service import DaemonOptions

__all__ = ["Options", "build", "makeService"]


class Options(DaemonOptions):
    section = "file"

    def postOptions(self) -> None:
        raise usage.UsageError("sockd-file is not yet configured in this release")


def build(config: Config, reactor: Any) -> list[IService]:
    raise SystemExit(
        "sockd: [file] is not yet configured in this release; set enabled = false"
    )


def makeService(options: Options, reactor: Any = None) -> MultiService:
    raise SystemExit("sockd-file is not yet configured in this release")
