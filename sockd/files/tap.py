"""C{twistd sockd-file}: the file server (bare netcat/Gopher and framed)."""

from __future__ import annotations

from twisted.application.service import IService, MultiService

from sockd.core.config import Config
from sockd.core.interfaces import IDaemonReactor
from sockd.core.service import DaemonOptions, stream_listener
from sockd.files.protocol import FileFactory, FileState, open_root

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
    optParameters = [
        *DaemonOptions.optParameters,
        ["root", "r", None, "directory served"],
        ["symlinks", None, None, "inside (follow those staying inside root) or refuse"],
        ["hardlinks", None, None, "allow or refuse files with more than one link"],
        ["bare-errors", None, None, "bare requests that fail: close or line"],
        ["max-upload", None, None, "largest upload accepted, e.g. 100M"],
        ["max-connections", None, None, "connections in total"],
        ["max-connections-per-ip", None, None, "connections per client address"],
        ["request-timeout", None, None, "seconds a request line may take"],
        ["idle-timeout", None, None, "seconds a silent connection stays open"],
        ["rate-limit", None, None, "bytes per second per connection (0: no cap)"],
        ["total-rate-limit", None, None, "bytes per second in total (0: no cap)"],
    ]
    optFlags = [
        ["writable", "w", "accept uploads (PUT)"],
        ["overwrite", None, "let uploads replace existing files"],
        ["hidden", None, "serve names starting with a dot"],
    ]
    keyOptions = {
        "root": "root",
        "symlinks": "symlinks",
        "hardlinks": "hardlinks",
        "bare-errors": "bare_errors",
        "max-upload": "max_upload",
        "max-connections": "max_connections",
        "max-connections-per-ip": "max_connections_per_ip",
        "request-timeout": "request_timeout",
        "idle-timeout": "idle_timeout",
        "rate-limit": "rate_limit",
        "total-rate-limit": "total_rate_limit",
    }

    def opt_listen(self, endpoint: str) -> None:
        """TCP endpoint to listen on (repeatable), e.g. tcp:8898."""
        self._add_list("listen", endpoint)

    opt_l = opt_listen

    def postOptions(self) -> None:
        for flag in ("writable", "overwrite", "hidden"):
            if self[flag]:
                self.overrides.setdefault("file", {})[flag] = "true"
        super().postOptions()


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
    return [
        stream_listener("file", description, factory, reactor, config.sockd.backlog)
        for description in settings.listen
    ]


def makeService(
    options: Options, reactor: IDaemonReactor | None = None
) -> MultiService:
    return options.make_service({"file": build}, reactor)
