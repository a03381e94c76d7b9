"""
Sending a file body over a transport without holding it in memory.

 - L{SendfileProducer}: zero-copy C{os.sendfile} straight off the socket of a
   plain TCP (or UNIX) transport, only once the transport's own buffer is
   empty (the response header goes first), a byte budget per reactor turn so
   other connections are served, and C{EAGAIN} answered by waiting for the
   socket to become writable through the transport itself.
 - L{ChunkProducer}: the fallback under TLS or without C{os.sendfile}: a pull
   producer reading 256 KiB at a time.

Both send exactly the bytes announced, stop early (and say so) when the file
shrinks, close the file descriptor whatever happens, and unregister
themselves from the transport before their L{Deferred} fires, so the caller
may close the connection or send the next response at once.

Twisted has no sendfile support; this relies on three attributes of
C{twisted.internet.abstract.FileDescriptor} (C{dataBuffer}, C{offset},
C{_tempDataLen}) to see that the transport's buffer is empty.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IPullProducer,
    IReactorTime,
    ISSLTransport,
)
from zope.interface import implementer

__all__ = [
    "CHUNK",
    "TURN_BUDGET",
    "Bucket",
    "ChunkProducer",
    "Pacer",
    "SendfileProducer",
    "TransferError",
    "can_sendfile",
    "send_file",
]

#: bytes the fallback reads and writes at a time
CHUNK = 256 * 1024
#: bytes sendfile may push for one connection in one reactor turn
TURN_BUDGET = 4 * 1024 * 1024


class TransferError(Exception):
    """A transfer ended early: C{sent} bytes of those announced went out."""

    def __init__(self, reason: str, sent: int) -> None:
        super().__init__(reason, sent)
        self.reason = reason
        self.sent = sent

    def __str__(self) -> str:
        return f"{self.reason} after {self.sent} bytes"


class Bucket:
    """A byte-rate token bucket holding at most one second of tokens."""

    __slots__ = ("clock", "rate", "stamp", "tokens")

    def __init__(self, rate: float, clock: IReactorTime) -> None:
        self.rate = float(rate)
        self.clock = clock
        self.tokens = self.rate
        self.stamp = clock.seconds()

    def available(self) -> int:
        now = self.clock.seconds()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return max(0, int(self.tokens))

    def spend(self, count: int) -> None:
        self.tokens -= count

    def wait(self, count: int) -> float:
        """Seconds until C{count} tokens (at most one second's worth) exist."""
        missing = min(count, self.rate) - self.tokens
        return max(0.001, missing / self.rate)


class Pacer:
    """Any number of buckets (per connection, total); all must allow."""

    #: a paused transfer waits for at least this many bytes of allowance, so
    #: a slow cap means fewer, larger sends rather than many tiny ones
    MIN_SEND = 16 * 1024

    def __init__(self, *buckets: Bucket | None) -> None:
        self.buckets = [b for b in buckets if b is not None]

    def allowance(self, wanted: int) -> int:
        for bucket in self.buckets:
            wanted = min(wanted, bucket.available())
        return wanted

    def spend(self, count: int) -> None:
        for bucket in self.buckets:
            bucket.spend(count)

    def delay(self) -> float:
        return max(bucket.wait(self.MIN_SEND) for bucket in self.buckets)


def can_sendfile(transport: Any) -> bool:
    """Whether C{transport} is a plain socket whose buffer we can see."""
    from twisted.internet.tcp import Connection

    return (
        hasattr(os, "sendfile")
        and isinstance(transport, Connection)
        and not ISSLTransport.providedBy(transport)
        and not getattr(transport, "TLS", False)
        and all(hasattr(transport, a) for a in ("dataBuffer", "offset", "_tempDataLen"))
    )


@implementer(IPullProducer)
class _Producer:
    """What both producers share: bookkeeping, pacing, and ending once."""

    def __init__(
        self,
        fd: int,
        offset: int,
        length: int,
        clock: IReactorTime,
        pacer: Pacer | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.fd = fd
        self.offset = offset
        self.remaining = length
        self.sent = 0
        self.clock = clock
        self.pacer = pacer if pacer is not None and pacer.buckets else None
        self.progress = progress
        self.transport: Any = None
        self.deferred: Deferred[int] = Deferred()
        self.done = False
        self._wake: IDelayedCall | None = None

    def start(self, transport: Any) -> Deferred[int]:
        """
        Register with C{transport} and send; the result fires with the byte
        count, or fails with L{TransferError}.  The transport must have no
        producer registered.
        """
        self.transport = transport
        if self.remaining <= 0:
            self._finish(None, unregister=False)
        else:
            transport.registerProducer(self, False)
        return self.deferred

    def _allowed(self, wanted: int) -> int:
        """Bytes the caps allow now; when none, arrange to be woken."""
        wanted = min(wanted, self.remaining)
        if self.pacer is None:
            return wanted
        allowed = self.pacer.allowance(wanted)
        if allowed <= 0 and (self._wake is None or not self._wake.active()):
            self._wake = self.clock.callLater(self.pacer.delay(), self._woken)
        return allowed

    def _woken(self) -> None:
        self._wake = None
        if not self.done:
            self.resumeProducing()

    def _count(self, count: int) -> None:
        self.offset += count
        self.remaining -= count
        self.sent += count
        if self.pacer is not None:
            self.pacer.spend(count)
        if self.progress is not None:
            self.progress(count)

    def _finish(self, error: str | None, unregister: bool = True) -> None:
        if self.done:
            return
        self.done = True
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
        os.close(self.fd)
        transport = self.transport
        # A TCP transport shows its producer: leave it alone if that is no
        # longer us.  A TLS wrapper does not (its attribute lookups fall
        # through to the TCP transport below it).
        if unregister and (
            not isinstance(transport, FileDescriptor) or transport.producer is self
        ):
            transport.unregisterProducer()
        if error is None:
            self.deferred.callback(self.sent)
        else:
            self.deferred.errback(TransferError(error, self.sent))

    def resumeProducing(self) -> None:
        raise NotImplementedError

    def pauseProducing(self) -> None:
        pass  # a pull producer is never paused: it is simply not asked

    def stopProducing(self) -> None:
        """The connection is gone."""
        self._finish("connection lost", unregister=False)


class SendfileProducer(_Producer):
    """C{os.sendfile} from the file to the transport's socket."""

    def resumeProducing(self) -> None:
        if self.done:
            return
        transport = self.transport
        if transport.disconnected or transport.disconnecting:
            self._finish("connection closing")
            return
        if len(transport.dataBuffer) - transport.offset or transport._tempDataLen:
            # The header (or an earlier answer) is still queued: the
            # transport calls us again once its buffer drains.
            transport.startWriting()
            return
        budget = self._allowed(TURN_BUDGET)
        if budget <= 0:
            return
        sock = transport.fileno()
        pushed = 0
        while pushed < budget:
            try:
                count = os.sendfile(
                    sock, self.fd, self.offset + pushed, budget - pushed
                )
            except BlockingIOError:
                break  # socket buffer full
            except OSError as e:
                self._count(pushed)
                self._finish(os.strerror(e.errno or errno.EIO))
                return
            if count == 0:
                self._count(pushed)
                self._finish("file shrank during the transfer")
                return
            pushed += count
        self._count(pushed)
        if self.remaining <= 0:
            self._finish(None)
            return
        # Ask the transport to tell us (through doWrite with an empty
        # buffer, which resumes a pull producer) when the socket can take
        # more: at once if the budget ran out, later after EAGAIN.
        if self._wake is None or not self._wake.active():
            transport.startWriting()


class ChunkProducer(_Producer):
    """Reads 256 KiB at a time and writes it; for TLS and other transports."""

    def resumeProducing(self) -> None:
        if self.done:
            return
        size = self._allowed(CHUNK)
        if size <= 0:
            return
        try:
            data = os.pread(self.fd, size, self.offset)
        except OSError as e:
            self._finish(os.strerror(e.errno or errno.EIO))
            return
        if not data:
            self._finish("file shrank during the transfer")
            return
        self._count(len(data))
        self.transport.write(data)
        if self.remaining <= 0:
            self._finish(None)


def send_file(
    transport: Any,
    fd: int,
    offset: int,
    length: int,
    clock: IReactorTime,
    pacer: Pacer | None = None,
    progress: Callable[[int], None] | None = None,
    use_sendfile: bool = True,
) -> tuple[_Producer, Deferred[int]]:
    """
    Send C{length} bytes of C{fd} from C{offset} over C{transport}, the
    fastest way it allows.  C{fd} is closed when the transfer ends.
    """
    kind = (
        SendfileProducer if use_sendfile and can_sendfile(transport) else ChunkProducer
    )
    producer = kind(fd, offset, length, clock, pacer, progress)
    return producer, producer.start(transport)
