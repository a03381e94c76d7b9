"""Tests of sockd.limits beyond what the echo tests exercise."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sockd.limits import ConnectionLimiter, RateLimiter, TokenBucket, peer_key


class PeerKeyTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        self.assertEqual(peer_key("127.0.0.2"), "127.0.0.2")

    def test_mapped(self) -> None:
        self.assertEqual(peer_key("::ffff:10.0.0.1"), "10.0.0.1")

    def test_ipv6_by_64(self) -> None:
        a = peer_key("2001:db8:1:2:aaaa::1")
        b = peer_key("2001:db8:1:2:bbbb::2")
        c = peer_key("2001:db8:1:3::1")
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)
        self.assertEqual(a, "2001:db8:1:2::/64")

    def test_scoped_ipv6(self) -> None:
        self.assertEqual(peer_key("fe80::1%eth0"), "fe80::/64")

    def test_not_an_address(self) -> None:
        self.assertEqual(peer_key("/run/sock"), "/run/sock")


class ConnectionLimiterTests(SynchronousTestCase):
    def test_counts(self) -> None:
        limiter = ConnectionLimiter(3, 2)
        self.assertIsNone(limiter.acquire("a"))
        self.assertIsNone(limiter.acquire("a"))
        self.assertEqual(limiter.acquire("a"), "too many connections from your address")
        self.assertIsNone(limiter.acquire("b"))
        self.assertEqual(limiter.acquire("c"), "too many connections to this server")
        self.assertEqual(limiter.refused, 2)
        limiter.release("a")
        self.assertIsNone(limiter.acquire("c"))

    def test_release_unknown_is_harmless(self) -> None:
        limiter = ConnectionLimiter(3, 2)
        limiter.release("nobody")
        self.assertEqual(limiter.total, 0)


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        clock = Clock()
        bucket = TokenBucket(2, 4, clock)
        self.assertEqual([bucket.take() for _ in range(6)], [True] * 4 + [False] * 2)
        clock.advance(0.5)
        self.assertEqual([bucket.take(), bucket.take()], [True, False])
        clock.advance(100)
        self.assertEqual(sum(bucket.take() for _ in range(10)), 4)


class RateLimiterTests(SynchronousTestCase):
    def test_sources_bounded(self) -> None:
        clock = Clock()
        limiter = RateLimiter(1, 1, 1e9, clock, max_sources=100)
        for i in range(10_000):
            limiter.allow(i)
        self.assertEqual(len(limiter.sources), 100)

    def test_recent_sources_kept(self) -> None:
        clock = Clock()
        limiter = RateLimiter(1, 1, 1e9, clock, max_sources=3)
        limiter.allow("busy")
        for other in ("x", "y"):
            limiter.allow(other)
            # "busy" keeps sending, so it is the last to be forgotten.
            self.assertFalse(limiter.allow("busy"))
        limiter.allow("z")
        self.assertIn("busy", limiter.sources)
        self.assertNotIn("x", limiter.sources)

    def test_global_bucket_caps_everyone(self) -> None:
        clock = Clock()
        limiter = RateLimiter(100, 100, 10, clock)
        allowed = sum(limiter.allow(i % 50) for i in range(1000))
        self.assertEqual(allowed, 100)  # the global burst
        self.assertEqual(limiter.dropped, 900)
