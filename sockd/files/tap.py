"""C{twistd sockd-file}: the file server (bare netcat/Gopher and framed)."""

from __future__ import annotations

from twisted.application.service import IService, MultiService

from sockd.core.config import Config
from sockd.core.interfaces import IDaemonReactor
from sockd.core.service import DaemonOptions, stream_listener
from sockd.files.protocol import FileFactory
from sockd.files.state import FileState, open_root

__all__ = ["Options", "build", "makeService"]


class Options(DaemonOptions):
    """Options for C{twistd sockd-file}; each overrides the C{[file]} key."""

    synopsis = "[--config FILE] [--root DIR] [--listen ENDPOINT]... [options]"
    longdesc = (
        "File server: a selector line in, the file out (netcat, the classic "
        "tutorial's client, Gopher), or framed GET/STAT/SUM/LIST/PUT "
        "requests. Settings come from the [file] section of the INI file; "
        "these options override it."
    )
    section = "file"


def build(config: Config, reactor: IDaemonReactor) -> list[IService]:
    """The file listeners described by C{config.file}."""
    settings = config.file
    if settings.root is None:
        raise SystemExit(f"{config.source}: [file] root is not set")
    try:
        root = open_root(settings)
    except OSError as e:
        raise SystemExit(
            f"{config.source}: [file] root = {settings.root}: cannot open: {e.strerror}"
        ) from None
    state = FileState(settings, reactor, root)
    factory = FileFactory(state, reactor, config.sockd.abort_grace)
    # Its own factory (every connection HTTP), the same state and counters.
    http_factory = FileFactory(
        state,
        reactor,
        config.sockd.abort_grace,
        http_only=True,
        primary=not settings.listen,
    )
    return [
        *(
            stream_listener(
                "file",
                description,
                f,
                reactor,
                config.sockd.backlog,
                settings.client_certs,
                settings.client_ca,
            )
            for f, listen in (
                (factory, settings.listen),
                (http_factory, settings.listen_http),
            )
            for description in listen
        )
    ]


def makeService(
    options: Options, reactor: IDaemonReactor | None = None
) -> MultiService:
    return options.make_service({"file": build}, reactor)
