"""C{twistd sockd}: every service enabled in the INI file, in one process."""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.python import usage

from sockd.core.interfaces import IDaemonReactor
from sockd.core.service import DaemonOptions
from sockd.daemons import DAEMONS

__all__ = ["Options", "makeService"]


class Options(DaemonOptions):
    """Options for C{twistd sockd}."""

    synopsis = "[--config FILE] [--set SECTION.KEY=VALUE]..."
    longdesc = (
        "Runs every service whose section says enabled = true, in one "
        "process. --set overrides any key, e.g. --set echo.mode=raw."
    )

    def postOptions(self) -> None:
        super().postOptions()
        if not self.enabled_sections():
            raise usage.UsageError(
                f"{self.config.source}: no service is enabled; set enabled = true "
                "in at least one of: " + ", ".join(f"[{s}]" for s in DAEMONS)
            )

    def enabled_sections(self) -> list[str]:
        return [s for s in DAEMONS if getattr(self.config, s).enabled]


def makeService(
    options: Options, reactor: IDaemonReactor | None = None
) -> MultiService:
    """Every enabled section's service, in one process."""
    builders = {section: DAEMONS[section] for section in options.enabled_sections()}
    return options.make_service(builders, reactor)
