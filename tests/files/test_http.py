"""
Tests for L{sockd.files.http}: HTTP/1.1 on the file port, in memory
(twisted.web's channel on a L{StringTransport}): detection, headers,
ranges, conditionals, the index, uploads and their limits.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import datetimeToString

import sockd.files.codec as codec
from sockd.files.http import FileChannel, parse_range
from sockd.files.protocol import FileFactory
from sockd.files.state import FileState
from tests.files.test_protocol import BODY, CANARY, make_tree
from tests.helpers import connect, settings


def response(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """The status, headers (lower-case names) and body of one response."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        headers[name.lower()] = value
    return status, headers, body


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size, _, rest = body.partition(b"\r\n")
        count = int(size, 16)
        if count == 0:
            return out
        out += rest[:count]
        body = rest[count + 2 :]


class HttpBase(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).resolve()
        self.base.mkdir()
        self.root = make_tree(self.base)
        self.clock = Clock()
        self.factory = self.make()

    def make(self, http_only: bool = False, **keys: str) -> FileFactory:
        if keys.get("writable") == "true":
            keys.setdefault("upload_allow", "0.0.0.0/0 ::/0")
        config = settings(file={"root": str(self.root), "enabled": "true", **keys})
        self.state = FileState(config.file, self.clock)
        self.addCleanup(self.state.root.close)
        return FileFactory(self.state, self.clock, abort_grace=5, http_only=http_only)

    def connect(self, factory: FileFactory | None = None) -> Any:
        return connect(factory or self.factory)

    def settle(self, transport: Any) -> None:
        """Turn the clock and the producers until the channel has the transport."""
        for _ in range(1000):
            producer = transport.producer
            if producer is None or isinstance(producer, FileChannel):
                self.clock.advance(0)
                if transport.producer is producer:
                    return
                continue
            producer.resumeProducing()
            self.clock.advance(0)
        raise AssertionError("the answer did not finish")

    def ask(
        self, request: bytes, factory: FileFactory | None = None
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        protocol, transport = self.connect(factory)
        protocol.dataReceived(request)
        self.settle(transport)
        return response(bytes(transport.value()))

    def get(
        self, target: bytes, *headers: bytes, method: bytes = b"GET"
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        extra = b"".join(h + b"\r\n" for h in headers)
        return self.ask(
            method + b" " + target + b" HTTP/1.1\r\nHost: t\r\n" + extra + b"\r\n"
        )


class DetectionTests(SynchronousTestCase):
    def events(self, *chunks: bytes) -> list[codec.Event]:
        parser = codec.RequestParser()
        found = []
        for chunk in chunks:
            parser.feed(chunk)
            while (event := parser.next_event()) is not None:
                found.append(event)
        return found

    def test_request_line_is_http(self) -> None:
        data = b"GET /notes.txt HTTP/1.1\r\nHost: x\r\n\r\n"
        self.assertEqual(self.events(data), [codec.HttpStart(data)])

    def test_split_at_every_byte(self) -> None:
        data = b"PUT /a%20b HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc"
        line = data.index(b"\n") + 1
        for cut in range(1, len(data)):
            # What came with the line; the rest is the channel's, not the parser's.
            expected = data if cut < line else data[:cut]
            events = self.events(data[:cut], data[cut:])
            self.assertEqual(events, [codec.HttpStart(expected)], cut)

    def test_not_http(self) -> None:
        # Framed GET with arguments, lower-case method, HTTP/2, no version.
        self.assertEqual(
            self.events(b"GET notes.txt 5\n"),
            [codec.Request(b"GET", (b"notes.txt", b"5"))],
        )
        self.assertEqual(
            self.events(b"get / HTTP/1.1\n"), [codec.BareRequest(b"get / HTTP/1.1")]
        )
        self.assertEqual(
            self.events(b"GET / HTTP/2.0\n"),
            [codec.Request(b"GET", (b"/", b"HTTP/2.0"))],
        )

    def test_only_the_first_line(self) -> None:
        events = self.events(b"GET a\n", b"GET / HTTP/1.1\n")
        self.assertEqual(
            events,
            [
                codec.Request(b"GET", (b"a",)),
                codec.Request(b"GET", (b"/", b"HTTP/1.1")),
            ],
        )

    def test_parse_range(self) -> None:
        cases = {
            b"bytes=0-99": (0, 99),
            b"bytes=10-": (10, 99),
            b"bytes=-10": (90, 99),
            b"bytes=-1000": (0, 99),
            b"bytes=50-5000": (50, 99),
            b"bytes=100-": (-1, -1),
            b"bytes=-0": (-1, -1),
            b"bytes=0-1,5-6": None,
            b"bytes=5-1": None,
            b"items=0-1": None,
            b"bytes=a-b": None,
            b"bytes=-": None,
        }
        for value, expected in cases.items():
            self.assertEqual(parse_range(value, 100), expected, value)
        self.assertEqual(parse_range(b"bytes=0-", 0), (-1, -1))


class GetTests(HttpBase):
    def test_headers_and_body(self) -> None:
        status, headers, body = self.get(b"/notes.txt")
        info = os.stat(self.root / "notes.txt")
        self.assertEqual(status, 200)
        self.assertEqual(body, b"hello notes\n")
        self.assertEqual(headers[b"content-length"], b"12")
        self.assertEqual(headers[b"content-type"], b"text/plain")
        self.assertEqual(headers[b"accept-ranges"], b"bytes")
        self.assertEqual(
            headers[b"etag"],
            b'"%x-%x-%x"' % (info.st_ino, info.st_size, info.st_mtime_ns),
        )
        self.assertEqual(  # Last-Modified rounds up to a whole second
            headers[b"last-modified"],
            datetimeToString(math.ceil(info.st_mtime)),
        )
        self.assertNotIn(b"repr-digest", headers)  # never hashed on a GET
        self.assertNotIn(b"digest", headers)

    def test_big_body(self) -> None:
        status, headers, body = self.get(b"/big.bin")
        self.assertEqual((status, body), (200, BODY))
        self.assertEqual(headers[b"content-type"], b"application/octet-stream")
        self.assertEqual(self.state.served, 1)
        self.assertEqual(self.state.bytes_sent, len(BODY))

    def test_head(self) -> None:
        status, headers, body = self.get(b"/big.bin", method=b"HEAD")
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(headers[b"content-length"], b"%d" % len(BODY))

    def test_percent_decoded(self) -> None:
        status, _, body = self.get(b"/with%20space%25.txt")
        self.assertEqual((status, body), (200, b"spaced\n"))

    def test_query_ignored(self) -> None:
        self.assertEqual(self.get(b"/notes.txt?x=1")[2], b"hello notes\n")

    def test_keep_alive_and_pipelining(self) -> None:
        protocol, transport = self.connect()
        one = b"GET /notes.txt HTTP/1.1\r\nHost: t\r\n\r\n"
        two = b"GET /docs/README.txt HTTP/1.1\r\nHost: t\r\n\r\n"
        protocol.dataReceived(one + two)
        self.settle(transport)
        self.settle(transport)
        value = bytes(transport.value())
        self.assertEqual(value.count(b"HTTP/1.1 200 OK"), 2)
        self.assertTrue(value.endswith(b"readme\n"))
        self.assertIn(b"hello notes\n", value)
        self.assertTrue(transport.connected)
        self.assertEqual(protocol.requests, 2)

    def test_pipelined_share_per_turn(self) -> None:
        """Pipelined requests: 64 answered per reactor turn, the rest after."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"HEAD /notes.txt HTTP/1.1\r\nHost: t\r\n\r\n" * 200)
        self.assertEqual(transport.value().count(b" 200 OK"), 64)
        for _ in range(10):
            self.clock.advance(0)
        self.assertEqual(transport.value().count(b" 200 OK"), 200)
        self.assertTrue(transport.connected)

    def test_errors(self) -> None:
        cases = {
            b"/missing": 404,
            b"/../canary": 403,
            b"/docs/../../canary": 403,
            b"/.hidden": 403,
            b"/out": 403,
            b"/fifo": 405,
            b"/bad%zz": 400,
            b"/nul%00": 400,
        }
        for target, code in cases.items():
            status, headers, body = self.get(target)
            self.assertEqual(status, code, target)
            self.assertEqual(headers[b"content-type"], b"text/plain; charset=utf-8")
            self.assertTrue(body.startswith(b"%d " % code), body)
            self.assertNotIn(CANARY, body)
        self.assertEqual(self.state.refused[404], 1)

    def test_method_not_allowed(self) -> None:
        status, headers, _ = self.get(b"/notes.txt", method=b"DELETE")
        self.assertEqual((status, headers[b"allow"]), (405, b"GET, HEAD"))
        writable = self.make(writable="true")
        status, headers, _ = self.ask(b"DELETE / HTTP/1.1\r\nHost: t\r\n\r\n", writable)
        self.assertEqual(headers[b"allow"], b"GET, HEAD, PUT")

    def test_body_on_get_refused(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /notes.txt HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
        status, headers, _ = response(bytes(transport.value()))
        self.assertEqual((status, headers[b"connection"]), (413, b"close"))
        self.assertFalse(transport.connected)

    def test_repr_digest_when_cached(self) -> None:
        _, opened = self.state.open(b"notes.txt", "file")
        done = self.state.checksum(opened)
        self.clock.advance(0)
        self.clock.advance(0)
        self.successResultOf(done)
        _, headers, _ = self.get(b"/notes.txt")
        digest = hashlib.sha256(b"hello notes\n").digest()
        self.assertEqual(
            headers[b"repr-digest"], b"sha-256=:" + base64.b64encode(digest) + b":"
        )
        self.assertEqual(headers[b"digest"], b"SHA-256=" + base64.b64encode(digest))

    def test_metrics(self) -> None:
        self.get(b"/notes.txt")
        self.get(b"/missing")
        samples = {
            (name, tuple(sorted(labels.items()))): value
            for name, _, labels, value in self.factory.metrics()
        }
        key = (
            "file_http_requests_total",
            (("code", "404"), ("method", "GET"), ("service", "file")),
        )
        self.assertEqual(samples[key], 1)


class ConditionalTests(HttpBase):
    def test_if_none_match(self) -> None:
        tag = self.get(b"/notes.txt")[1][b"etag"]
        status, headers, body = self.get(b"/notes.txt", b"If-None-Match: " + tag)
        self.assertEqual((status, body), (304, b""))
        self.assertEqual(headers[b"etag"], tag)
        status, _, _ = self.get(b"/notes.txt", b'If-None-Match: "other"')
        self.assertEqual(status, 200)
        status, _, _ = self.get(b"/notes.txt", b'If-None-Match: "x", ' + tag)
        self.assertEqual(status, 304)
        status, _, _ = self.get(b"/notes.txt", b"If-None-Match: *")
        self.assertEqual(status, 304)

    def test_if_modified_since(self) -> None:
        modified = self.get(b"/notes.txt")[1][b"last-modified"]
        status, _, body = self.get(b"/notes.txt", b"If-Modified-Since: " + modified)
        self.assertEqual((status, body), (304, b""))
        old = datetimeToString(1000)
        self.assertEqual(self.get(b"/notes.txt", b"If-Modified-Since: " + old)[0], 200)

    def test_if_none_match_decides_alone(self) -> None:
        """RFC 9110 13.2.2: a stale tag wins over a matching date."""
        modified = self.get(b"/notes.txt")[1][b"last-modified"]
        status, headers, _ = self.get(
            b"/notes.txt",
            b'If-None-Match: "stale"',
            b"If-Modified-Since: " + modified,
        )
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"last-modified"], modified)


class RangeTests(HttpBase):
    def test_single_range(self) -> None:
        status, headers, body = self.get(b"/big.bin", b"Range: bytes=100-199")
        self.assertEqual((status, body), (206, BODY[100:200]))
        self.assertEqual(headers[b"content-range"], b"bytes 100-199/%d" % len(BODY))
        self.assertEqual(headers[b"content-length"], b"100")

    def test_suffix_and_open(self) -> None:
        self.assertEqual(self.get(b"/big.bin", b"Range: bytes=-4")[2], b"tail")
        self.assertEqual(self.get(b"/big.bin", b"Range: bytes=1000-")[2], BODY[1000:])

    def test_unsatisfiable(self) -> None:
        status, headers, _ = self.get(b"/notes.txt", b"Range: bytes=12-")
        self.assertEqual(status, 416)
        self.assertEqual(headers[b"content-range"], b"bytes */12")

    def test_several_ranges_get_everything(self) -> None:
        status, headers, body = self.get(b"/notes.txt", b"Range: bytes=0-1,3-4")
        self.assertEqual((status, body), (200, b"hello notes\n"))
        self.assertNotIn(b"content-range", headers)

    def test_if_range(self) -> None:
        headers = self.get(b"/notes.txt")[1]
        tag, modified = headers[b"etag"], headers[b"last-modified"]
        for validator, status in (
            (tag, 206),
            (b'"old"', 200),
            (modified, 206),
            (datetimeToString(1000), 200),
        ):
            answer = self.get(
                b"/notes.txt", b"Range: bytes=0-4", b"If-Range: " + validator
            )
            self.assertEqual(answer[0], status, validator)
            self.assertEqual(answer[2], b"hello" if status == 206 else b"hello notes\n")

    def test_head_ignores_range(self) -> None:
        status, headers, body = self.get(
            b"/notes.txt", b"Range: bytes=0-1", method=b"HEAD"
        )
        self.assertEqual((status, body, headers[b"content-length"]), (200, b"", b"12"))


class IndexTests(HttpBase):
    def test_html_escaped(self) -> None:
        (self.root / 'a <b> & "q".txt').write_bytes(b"x")
        status, headers, body = self.get(b"/")
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], b"text/html; charset=utf-8")
        page = dechunk(body).decode()
        self.assertIn(
            '<a href="a%20%3Cb%3E%20%26%20%22q%22.txt">'
            "a &lt;b&gt; &amp; &quot;q&quot;.txt</a>",
            page,
        )
        self.assertIn('<a href="docs/">docs/</a>', page)
        self.assertIn('<a href="with%20space%25.txt">', page)
        self.assertNotIn("hidden", page)
        self.assertNotIn("fifo", page)
        self.assertNotIn('href="../"', page)  # no parent of the root
        self.assertIn("<td>12</td>", page)  # notes.txt's size

    def test_parent_link(self) -> None:
        page = dechunk(self.get(b"/docs/")[2]).decode()
        self.assertIn('<a href="../">../</a>', page)
        self.assertIn("Index of /docs/", page)

    def test_text(self) -> None:
        status, headers, body = self.get(b"/?format=text")
        self.assertEqual(headers[b"content-type"], b"text/plain; charset=utf-8")
        self.assertEqual(
            dechunk(body),
            b"big.bin\ndocs/\nempty\nnotes.txt\nwith space%.txt\n",
        )

    def test_text_when_accepted(self) -> None:
        listing = b"big.bin\ndocs/\nempty\nnotes.txt\nwith space%.txt\n"
        _, headers, body = self.get(b"/", b"Accept: text/plain")
        self.assertEqual(headers[b"content-type"], b"text/plain; charset=utf-8")
        self.assertEqual(headers[b"vary"], b"Accept")
        self.assertEqual(dechunk(body), listing)
        # A browser names text/html (and */*): it gets the page.
        browser = b"Accept: text/html,application/xhtml+xml,text/plain;q=0.8,*/*"
        _, headers, _ = self.get(b"/", browser)
        self.assertEqual(headers[b"content-type"], b"text/html; charset=utf-8")

    def test_redirect(self) -> None:
        status, headers, _ = self.get(b"/docs?format=text")
        self.assertEqual((status, headers[b"location"]), (301, b"/docs/?format=text"))

    def test_truncated(self) -> None:
        factory = self.make(max_list_entries="2")
        body = self.ask(b"GET /?format=text HTTP/1.1\r\n\r\n", factory)[2]
        self.assertEqual(
            dechunk(body), b"big.bin\ndocs/\n# truncated: more than 2 entries\n"
        )


class UploadTests(HttpBase):
    def put(
        self, target: bytes, body: bytes, factory: FileFactory, *headers: bytes
    ) -> tuple[Any, Any]:
        protocol, transport = self.connect(factory)
        extra = b"".join(h + b"\r\n" for h in headers)
        protocol.dataReceived(
            b"PUT %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n"
            % (target, len(body), extra)
        )
        protocol.dataReceived(body)
        for _ in range(10):
            self.clock.advance(0)
        return protocol, transport

    def test_created_then_replaced(self) -> None:
        factory = self.make(writable="true", overwrite="true")
        _, transport = self.put(b"/new%20file", b"first", factory)
        status, headers, body = response(bytes(transport.value()))
        self.assertEqual(status, 201)
        self.assertIn(b"stored 5 bytes", body)
        self.assertEqual((self.root / "new file").read_bytes(), b"first")
        _, transport = self.put(b"/new%20file", b"second", factory)
        self.assertEqual(response(bytes(transport.value()))[0], 204)
        self.assertEqual((self.root / "new file").read_bytes(), b"second")

    def test_refusals(self) -> None:
        cases = [
            (self.make(), b"/x", 403),
            (self.make(writable="true"), b"/notes.txt", 409),
            (self.make(writable="true"), b"/.sockd-upload.0123456789abcdef", 403),
            (self.make(writable="true"), b"/../x", 403),
            (self.make(writable="true", max_upload="3"), b"/x", 413),
            # upload_allow holds for HTTP as for the framed PUT
            (self.make(writable="true", upload_allow="10.9.9.0/24"), b"/y", 403),
        ]
        for factory, target, code in cases:
            _, transport = self.put(target, b"abcd", factory, b"Expect: 100-continue")
            value = bytes(transport.value())
            status, headers, _ = response(value)
            self.assertEqual(status, code, target)
            # Answered before the body: no "100 Continue" invites it.
            self.assertNotIn(b"100 Continue", value)
            self.assertEqual(headers[b"connection"], b"close")
            self.assertFalse(transport.connected)
        self.assertEqual((self.root / "notes.txt").read_bytes(), b"hello notes\n")
        self.assertFalse((self.root / "y").exists())

    def test_over_max_upload_refused_before_the_body(self) -> None:
        factory = self.make(writable="true", max_upload="10")
        protocol, transport = self.connect(factory)
        protocol.dataReceived(
            b"PUT /x HTTP/1.1\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"
        )
        self.assertEqual(response(bytes(transport.value()))[0], 413)
        self.assertFalse((self.root / "x").exists())

    def test_chunked_needs_length(self) -> None:
        factory = self.make(writable="true")
        protocol, transport = self.connect(factory)
        protocol.dataReceived(
            b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        self.assertEqual(response(bytes(transport.value()))[0], 411)
        self.assertFalse((self.root / "x").exists())

    def test_streamed_not_buffered(self) -> None:
        """The body reaches the temporary file as it arrives."""
        factory = self.make(writable="true")
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"PUT /x HTTP/1.1\r\nContent-Length: 200000\r\n\r\n")
        protocol.dataReceived(b"a" * 150000)
        temps = [p for p in self.root.iterdir() if p.name.startswith(".sockd-upload.")]
        self.assertEqual([p.stat().st_size for p in temps], [150000])
        request = protocol._http.requests[-1]
        self.assertEqual(request.content.getvalue(), b"")
        protocol.dataReceived(b"a" * 50000)
        self.clock.advance(0)
        self.assertEqual(response(bytes(transport.value()))[0], 201)
        self.assertEqual((self.root / "x").stat().st_size, 200000)
        self.assertFalse(any(p.name.startswith(".sockd-") for p in self.root.iterdir()))

    def test_upload_in_flight_finishes_at_shutdown(self) -> None:
        factory = self.make(writable="true")
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"PUT /x HTTP/1.1\r\nContent-Length: 6\r\n\r\nabc")
        factory.drain(10)
        self.assertTrue(transport.connected)
        protocol.dataReceived(b"def")
        self.clock.advance(0)
        self.assertEqual(response(bytes(transport.value()))[0], 201)
        self.assertEqual((self.root / "x").read_bytes(), b"abcdef")
        self.assertFalse(transport.connected)
        late, transport = self.connect(factory)
        late.dataReceived(b"GET /x HTTP/1.1\r\n\r\n")
        self.assertEqual(response(bytes(transport.value()))[0], 503)

    def test_cut_connection_removes_temporary(self) -> None:
        factory = self.make(writable="true")
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"PUT /x HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
        self.assertEqual(len(self.state.uploads), 1)
        transport.loseConnection()
        self.assertEqual(self.state.uploads, set())
        self.assertEqual(
            [p.name for p in self.root.iterdir() if p.name.startswith(".sockd")], []
        )
        self.assertFalse((self.root / "x").exists())


class ConnectionTests(HttpBase):
    def test_request_deadline(self) -> None:
        factory = self.make(request_timeout="5")
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        for _ in range(9):
            self.clock.advance(0.5)
            protocol.dataReceived(b"X-Slow: 1\r\n")  # trickling does not extend it
        self.assertTrue(transport.connected)
        self.clock.advance(0.6)
        self.assertFalse(transport.connected)

    def test_half_close_after_request(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        protocol.readConnectionLost()
        self.settle(transport)
        self.assertEqual(response(bytes(transport.value()))[2], BODY)
        self.assertFalse(transport.connected)

    def test_http_only_listener(self) -> None:
        factory = self.make(http_only=True)
        protocol, transport = self.connect(factory)
        self.assertIsInstance(transport.producer, FileChannel)
        protocol.dataReceived(b"GET /notes.txt HTTP/1.0\r\n\r\n")
        self.settle(transport)
        status, _, body = response(bytes(transport.value()))
        self.assertEqual((status, body), (200, b"hello notes\n"))
        self.assertFalse(transport.connected)  # HTTP/1.0: not persistent

    def test_http_only_refusal(self) -> None:
        factory = self.make(http_only=True, max_connections_per_ip="1")
        self.connect(factory)
        _, transport = self.connect(factory)
        status, headers, body = response(bytes(transport.value()))
        self.assertEqual((status, headers[b"connection"]), (429, b"close"))
        self.assertTrue(body.startswith(b"429 "))

    def test_shutdown_between_requests(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /notes.txt HTTP/1.1\r\nHost: t\r\n\r\n")
        self.settle(transport)
        self.factory.drain(10)
        self.assertFalse(transport.connected)


class RateTests(HttpBase):
    def test_rate_limit_paces_the_body(self) -> None:
        """The body goes through the same pacer: a second's worth at a time."""
        factory = self.make(rate_limit="256K")
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        for _ in range(50):
            producer = transport.producer
            if producer is not None and not isinstance(producer, FileChannel):
                producer.resumeProducing()
            self.clock.advance(0)
        status, _, body = response(bytes(transport.value()))
        self.assertEqual(status, 200)
        self.assertEqual(len(body), 256 * 1024)  # the first second's burst
        sizes = []
        for _ in range(60):
            self.clock.advance(0.1)
            producer = transport.producer
            if producer is not None and not isinstance(producer, FileChannel):
                producer.resumeProducing()
            sizes.append(len(response(bytes(transport.value()))[2]))
        self.assertEqual(response(bytes(transport.value()))[2], BODY)
        # 1 MiB at 256 KiB/s after the first 256 KiB: not done in 2 s, done in 6.
        self.assertLess(sizes[19], len(BODY))
        self.assertLessEqual(sizes[19], 3 * 256 * 1024)


async def keep_alive(tls: bool, tmp_path: Path) -> bytes:
    """Two GETs on one real connection, the second with Connection: close."""
    from twisted.internet import reactor as _reactor
    from twisted.internet import ssl
    from twisted.internet.endpoints import (
        TCP4ClientEndpoint,
        connectProtocol,
        wrapClientTLS,
    )

    from tests.files.test_protocol import Collector
    from tests.files.test_sendfile import self_signed_pem

    reactor: Any = _reactor
    root = make_tree(tmp_path)
    config = settings(file={"root": str(root), "enabled": "true"})
    state = FileState(config.file, reactor)
    factory = FileFactory(state, reactor, abort_grace=5)
    if tls:
        certificate = ssl.PrivateCertificate.loadPEM(self_signed_pem())
        port = reactor.listenSSL(
            0, factory, certificate.options(), interface="127.0.0.1"
        )
    else:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        if tls:
            endpoint = wrapClientTLS(ssl.CertificateOptions(verify=False), endpoint)
        collector = Collector()
        await connectProtocol(endpoint, collector).addTimeout(10, reactor)
        collector.transport.write(  # type: ignore[union-attr]
            b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /notes.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        data: bytes = await collector.lost.addTimeout(10, reactor)
    finally:
        await port.stopListening()
        state.root.close()
    return data


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("tls", [False, True], ids=["sendfile", "tls"])
async def test_keep_alive_real_connection(tls: bool, tmp_path: Path) -> None:
    """A body by sendfile (or chunks under TLS), then the next request's answer."""
    data = await keep_alive(tls, tmp_path)
    status, headers, rest = response(data)
    assert (status, headers[b"content-length"]) == (200, b"%d" % len(BODY))
    assert rest[: len(BODY)] == BODY
    status, headers, body = response(rest[len(BODY) :])
    assert (status, body, headers[b"connection"]) == (200, b"hello notes\n", b"close")
