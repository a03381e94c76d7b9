"""
One worker process of C{[sockd] workers}: C{python -m sockd.worker}, started
by the main process's L{sockd.core.workers.Workers}, never by hand.  It
reads its instructions from the environment, builds the services they name
(L{sockd.daemons}), serves the sockets the main process shares, and reports
on its standard output.
"""

from __future__ import annotations

import json
import os
import signal
from typing import cast

from twisted.internet import stdio, task
from twisted.logger import ILogObserver, globalLogBeginner

import sockd.core.config as _config
from sockd.core.service import (
    Lifecycle,
    Listener,
    global_reactor,
    make_daemon_service,
)
from sockd.core.workers import (
    REPORT_INTERVAL,
    SPEC_VARIABLE,
    Channel,
    pretend_systemd,
)
from sockd.daemons import DAEMONS

__all__ = ["main"]


def main() -> None:
    """Run one worker, as the main process's L{Workers} describes it."""
    if SPEC_VARIABLE not in os.environ:
        raise SystemExit(
            f"sockd.worker: no {SPEC_VARIABLE} in the environment; workers are "
            "started by the daemon itself ([sockd] workers in the INI file)"
        )
    spec = json.loads(os.environ.pop(SPEC_VARIABLE))
    reactor = global_reactor()
    # Ctrl-C reaches the whole process group; the main process decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    stopping: list[bool] = []

    def stop() -> None:
        if not stopping and reactor.running:
            stopping.append(True)
            reactor.stop()

    channel = Channel(lambda: reactor.callLater(0, stop))
    stdio.StandardIO(channel, reactor=reactor)
    observer = cast(ILogObserver, channel.log_event)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    pretend_systemd(spec)
    overrides = spec.get("overrides") or {}

    def loader() -> _config.Config:
        return _config.load(spec["config"], overrides, runs=spec["sections"])

    try:
        config = loader()
    except _config.ConfigError as e:
        raise SystemExit(f"sockd: {e}") from None
    inherited: dict[tuple[str, str], int | tuple[str, int]] = {
        (entry["section"], entry["description"]): (
            int(entry["fd"])
            if "fd" in entry
            else (str(entry["address"][0]), int(entry["address"][1]))
        )
        for entry in spec["listeners"]
    }
    builders = {section: DAEMONS[section] for section in spec["sections"]}
    top = make_daemon_service(config, builders, reactor, loader, inherited=inherited)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(stop))
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)

    # Adopting the sockets needs no running reactor: a failure exits here,
    # its message on standard error, which the main process logs.
    top.startService()
    lifecycle = top.getServiceNamed("lifecycle")
    assert isinstance(lifecycle, Lifecycle)
    if spec.get("metrics"):
        # Only when asked for: prometheus_client takes time to import.
        from sockd.core.metrics import SockdCollector

        counters = SockdCollector(lambda: [t for _, t in lifecycle.targets()])
        task.LoopingCall(lambda: channel.send({"metrics": counters.snapshot()})).start(
            REPORT_INTERVAL
        )
    where = "; ".join(
        f"{child.service} {' '.join(child.where())}"
        for child in top
        if isinstance(child, Listener) and child.port is not None
    )
    channel.send({"ready": where or "nothing"})
    # The reactors take installSignalHandlers; IReactorCore.run does not say so.
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]


if __name__ == "__main__":
    main()
