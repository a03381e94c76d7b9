"""The reactor that runs nothing: given where Twisted wants one and nothing may run."""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.trial.unittest import SynchronousTestCase

from sockd.core.reactors import StandInReactor, TLSListener


class StandInReactorTests(SynchronousTestCase):
    def test_every_call_does_nothing(self) -> None:
        reactor: Any = StandInReactor()
        self.assertIsNone(reactor.listenTCP(80, Factory()))
        self.assertIsNone(reactor.addWriter(object()))
        self.assertIsNone(reactor.callLater(1, self.fail))
        self.assertEqual(reactor.tls_listeners, [])

    def test_a_parsed_endpoint_binds_nothing(self) -> None:
        # As the config check parses a description: listening does nothing.
        endpoint = serverFromString(StandInReactor(), "tcp:0:interface=127.0.0.1")
        self.assertIsNone(self.successResultOf(endpoint.listen(Factory())))

    def test_tls_listeners_kept(self) -> None:
        reactor = StandInReactor()
        context: Any = object()  # what Twisted's parser builds
        reactor.listenSSL(8443, Factory(), context, interface="::1")
        self.assertEqual(
            reactor.tls_listeners,
            [TLSListener(8443, context, 50, "::1")],
        )
