"""
Sending a file body over a transport without holding it in memory.

 - L{SendfileProducer}: zero-copy C{os.sendfile} straight off the socket of a
   plain TCP (or UNIX) transport, only once the transport's own buffer is
   empty (the response header goes first), a byte budget per reactor turn so
   other connections are served, and C{EAGAIN} answered by waiting for the
   socket to become writable through the transport itself.  On Linux TCP
   the socket is corked (C{TCP_CORK}) from the response header to the
   body's last byte, so the kernel sends only full segments meanwhile, and
   uncorked whenever the transfer ends or waits for its rate cap, so
   neither the header nor the tail waits.
 - L{ChunkProducer}: the fallback under TLS or without C{os.sendfile}: a push
   producer reading 256 KiB at a time.  It never corks: under TLS the bytes
   reach the socket from Twisted's buffers at a time it does not see, so it
   could not uncork just after the last one.

A L{Pacer} holds either to byte rates (token buckets from L{sockd.core.limits}),
sending in quanta paid for in advance rather than every crumb of refill.

Behind a C{haproxy:} listener L{SendfileProducer} works on the TCP
transport under the PROXY header wrapper (L{sockd.core.eager.unwrap}),
which only passes writes and producers through.

Both send exactly the bytes announced, stop early (and say so) when the file
shrinks, close the file descriptor whatever happens, and unregister
themselves from the transport before their L{Deferred} fires, so the caller
may close the connection or send the next response at once.

Twisted has no sendfile support; this relies on three attributes of
C{twisted.internet.abstract.FileDescriptor} (through
L{sockd.core._twisted.queued_bytes}) to see that the transport's buffer is
empty.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable
from typing import Any, ClassVar

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IProducer,
    IPullProducer,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from zope.interface import implementer

from sockd.core._twisted import fast_paths, queued_bytes
from sockd.core.eager import eager_write, unwrap
from sockd.core.limits import TokenBucket

__all__ = [
    "CHUNK",
    "TURN_BUDGET",
    "ChunkProducer",
    "Pacer",
    "SendfileProducer",
    "TransferError",
    "can_sendfile",
    "release",
    "send_file",
]

#: bytes the fallback reads and writes at a time
CHUNK = 256 * 1024
#: bytes sendfile may push for one connection in one reactor turn
TURN_BUDGET = 4 * 1024 * 1024
#: Linux's TCP_CORK (nginx's C{tcp_nopush}); None elsewhere
_CORK: int | None = getattr(socket, "TCP_CORK", None)


class TransferError(Exception):
    """A transfer ended early: C{sent} bytes of those announced went out."""

    def __init__(self, reason: str, sent: int) -> None:
        super().__init__(reason, sent)
        self.reason = reason
        self.sent = sent

    def __str__(self) -> str:
        return f"{self.reason} after {self.sent} bytes"


class Pacer:
    """
    Paces one transfer under token buckets (its own cap, a shared total):
    all must allow.  It pays for a quantum of bytes in advance, from every
    bucket, waits until each has been refilled for it, then lets it all
    go.  The quantum is a fair share of L{PERIOD}'s worth of each bucket
    (at least L{QUANTUM}, at most the bucket's burst, or the rest of the
    transfer when that is smaller): a capped transfer wakes about once a
    L{PERIOD}, transfers sharing a total bucket queue up behind one another
    in turn, and none wakes for every crumb of refill.  (Each wake of an
    idle server costs a fixed ~0.2 ms of CPU, whatever it sends.)
    """

    #: the least worth waiting for, unless the rest of the transfer is smaller
    QUANTUM = 64 * 1024
    #: seconds of a bucket's rate shared out per round of its transfers
    PERIOD = 1.0
    #: transfers pacing on each bucket now
    _sharing: ClassVar[dict[TokenBucket, int]] = {}

    def __init__(self, *buckets: TokenBucket | None) -> None:
        self.buckets = [b for b in buckets if b is not None]
        for bucket in self.buckets:
            self._sharing[bucket] = self._sharing.get(bucket, 0) + 1
        #: bytes paid for and not sent yet, and when they may go
        self.paid = 0
        self.due = 0.0
        self.closed = False

    def _now(self) -> float:
        return self.buckets[0].clock.seconds()

    def quantum(self, remaining: int) -> int:
        """What to pay for next, of a transfer with C{remaining} to send."""
        step = remaining
        for bucket in self.buckets:
            share = bucket.rate * self.PERIOD / self._sharing.get(bucket, 1)
            step = min(step, int(min(bucket.burst, max(self.QUANTUM, share))))
        return max(1, step)

    def allowance(self, remaining: int) -> int:
        """
        Bytes that may go now, of a transfer with C{remaining} to send
        (0: wait L{delay}).  When the last payment is used up, pays for the
        next: all the buckets hold if that is at least a quantum, else a
        quantum in debt.
        """
        if self.paid <= 0 < remaining and not self.closed:
            step = self.quantum(remaining)
            free = min(bucket.available() for bucket in self.buckets)
            count = min(remaining, int(free)) if free >= step else step
            wait = max(bucket.delay(count) for bucket in self.buckets)
            for bucket in self.buckets:
                bucket.spend(count)
            self.paid = count
            self.due = self._now() + wait
        if self._now() < self.due:
            return 0
        return max(0, self.paid)

    def delay(self) -> float:
        """Seconds until what was paid for may go."""
        return max(0.0, self.due - self._now())

    def spend(self, count: int) -> None:
        """C{count} bytes of those paid for went out."""
        self.paid -= count

    def close(self) -> None:
        """
        The transfer ended: give back what was paid for and not sent, and
        leave the others sharing the buckets a larger share.
        """
        if self.closed:
            return
        self.closed = True
        for bucket in self.buckets:
            if self.paid > 0:
                bucket.refund(self.paid)
            left = self._sharing.pop(bucket, 1) - 1
            if left > 0:
                self._sharing[bucket] = left
        self.paid = 0


def release(transport: Any, producer: object) -> None:
    """Unregister C{producer} from C{transport}, if it is still registered."""
    # A TCP transport shows its producer: leave it alone if that is no
    # longer us.  A TLS wrapper does not (its attribute lookups fall
    # through to the TCP transport below it).
    if not isinstance(transport, FileDescriptor) or transport.producer is producer:
        transport.unregisterProducer()


def can_sendfile(transport: Any) -> bool:
    """Whether C{transport} is a plain socket whose buffer we can see."""
    from twisted.internet.tcp import Connection

    return (
        hasattr(os, "sendfile")
        and isinstance(transport, Connection)
        and not ISSLTransport.providedBy(transport)
        and not getattr(transport, "TLS", False)
        and fast_paths().tcp_write
    )


def _corkable(transport: Any) -> socket.socket | None:
    """The TCP socket under C{transport} if it can be corked, else None."""
    sock = getattr(transport, "socket", None)
    if (
        _CORK is None
        or not isinstance(sock, socket.socket)
        or sock.family not in (socket.AF_INET, socket.AF_INET6)
    ):
        return None
    return sock


@implementer(IProducer)
class _Producer:
    """What both producers share: bookkeeping, pacing, and ending once."""

    #: registered with the transport as a push (True) or pull producer
    streaming = False

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
        #: the socket while it is corked
        self._corked: socket.socket | None = None

    def start(self, transport: Any, head: bytes = b"") -> Deferred[int]:
        """
        Write C{head} (the response header), register with C{transport} and
        send; the result fires with the byte count, or fails with
        L{TransferError}.  The transport must have no producer registered.
        """
        self.transport = transport
        if self.remaining <= 0:
            if head:
                eager_write(transport, head)
            self._finish(None, unregister=False)
            return self.deferred
        self._begin(head)
        # A pull producer is asked for data at once; a push one starts
        # itself, on the next turn (as Twisted starts one under TLS).
        transport.registerProducer(self, self.streaming)
        if self.streaming and not self.done:
            self._wake = self.clock.callLater(0, self._woken)
        return self.deferred

    def _begin(self, head: bytes) -> None:
        """Write C{head}, first thing, before the body."""
        if head:
            eager_write(self.transport, head)

    def _cork(self) -> None:
        """Cork the socket (if it is Linux TCP) until L{_uncork}."""
        if self._corked is None and _CORK is not None:
            sock = _corkable(self.transport)
            if sock is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, _CORK, 1)
                except OSError:
                    return
                self._corked = sock

    def _uncork(self) -> None:
        """Let what the cork holds go now (the header, a quantum's tail)."""
        sock, self._corked = self._corked, None
        if sock is not None and _CORK is not None:
            # Closed already: nothing is held any more.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _CORK, 0)

    def _allowed(self, most: int) -> int:
        """
        Bytes (at most C{most}) the caps allow now; when none, arrange to
        be woken (L{_go}) once they do.
        """
        if self.pacer is None:
            return min(most, self.remaining)
        allowed = self.pacer.allowance(self.remaining)
        if allowed <= 0:
            if self._wake is None:
                self._wake = self.clock.callLater(self.pacer.delay(), self._woken)
            return 0
        return min(most, allowed)

    def _woken(self) -> None:
        self._wake = None
        if not self.done:
            self._go()

    def _go(self) -> None:
        """Send what may be sent now."""
        raise NotImplementedError

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
        self._uncork()
        if self.pacer is not None:
            self.pacer.close()
        os.close(self.fd)
        if unregister:
            release(self.transport, self)
        if error is None:
            self.deferred.callback(self.sent)
        else:
            self.deferred.errback(TransferError(error, self.sent))

    def stopProducing(self) -> None:
        """The connection is gone."""
        self._finish("connection lost", unregister=False)


@implementer(IPullProducer)
class SendfileProducer(_Producer):
    """C{os.sendfile} from the file to the transport's socket."""

    def resumeProducing(self) -> None:
        self._go()

    def _begin(self, head: bytes) -> None:
        # Corked first: the header waits for the body's first segment.
        self._cork()
        super()._begin(head)

    def _go(self) -> None:
        if self.done:
            return
        transport = self.transport
        if transport.disconnected or transport.disconnecting:
            self._finish("connection closing")
            return
        if queued_bytes(transport):
            # The header (or an earlier answer) is still queued: the
            # transport calls us again once its buffer drains.
            transport.startWriting()
            return
        budget = self._allowed(TURN_BUDGET)
        if budget <= 0:
            self._uncork()  # waiting for the cap: what is paid for goes now
            return
        self._cork()
        # One call a wake: a short count means the socket buffer is full
        # (asking again would only get EAGAIN) or the file ended early,
        # which the next call says with 0.
        try:
            pushed = os.sendfile(transport.fileno(), self.fd, self.offset, budget)
        except BlockingIOError:
            pushed = 0  # socket buffer full
        except OSError as e:
            self._finish(os.strerror(e.errno or errno.EIO))
            return
        else:
            if pushed == 0:
                self._finish("file shrank during the transfer")
                return
        self._count(pushed)
        if self.remaining <= 0:
            self._finish(None)
            return
        # Ask the transport to tell us (through doWrite with an empty
        # buffer, which resumes a pull producer) when the socket can take
        # more: at once if the budget ran out, later after EAGAIN.  A paced
        # transfer that has sent all it paid for waits for its next
        # quantum instead.
        if self._wake is None and self._allowed(TURN_BUDGET) > 0:
            transport.startWriting()
        else:
            self._uncork()  # waiting for the cap: this quantum's tail goes now


@implementer(IPushProducer)
class ChunkProducer(_Producer):
    """
    Reads 256 KiB at a time and writes it; for TLS and other transports.
    A push producer: it writes while the transport does not pause it, a
    chunk per reactor turn, and sleeps on a timer while paced (a pull
    producer under TLS would be polled in a busy loop meanwhile).
    """

    streaming = True
    paused = False

    def resumeProducing(self) -> None:
        self.paused = False
        self._go()

    def pauseProducing(self) -> None:
        self.paused = True

    def _go(self) -> None:
        if self.done or self.paused:
            return
        transport = self.transport
        if getattr(transport, "disconnecting", False) or getattr(
            transport, "disconnected", False
        ):
            self._finish("connection closing")
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
        transport.write(data)  # may pause us: the transport's buffer is full
        if self.remaining <= 0:
            self._finish(None)
        elif not self.paused and self._wake is None:
            # Room for more: the next chunk on the next turn, after the
            # other connections have had theirs.
            self._wake = self.clock.callLater(0, self._woken)


def send_file(
    transport: Any,
    fd: int,
    offset: int,
    length: int,
    clock: IReactorTime,
    pacer: Pacer | None = None,
    progress: Callable[[int], None] | None = None,
    use_sendfile: bool = True,
    head: bytes = b"",
) -> tuple[_Producer, Deferred[int]]:
    """
    Write C{head} (a response header, may be empty), then send C{length}
    bytes of C{fd} from C{offset} over C{transport}, the fastest way it
    allows.  C{fd} is closed when the transfer ends.
    """
    # Behind a PROXY header wrapper: sendfile on the TCP transport under it.
    plain = unwrap(transport)
    if use_sendfile and can_sendfile(plain):
        producer: _Producer = SendfileProducer(
            fd, offset, length, clock, pacer, progress
        )
        return producer, producer.start(plain, head)
    producer = ChunkProducer(fd, offset, length, clock, pacer, progress)
    return producer, producer.start(transport, head)
