"""
The JSON log schema (sockd.core.logs.json_record, json_observer), in memory
and from a real C{twistd --logger sockd.logs.json_observer}.
"""

from __future__ import annotations

import io
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from sockd.core.logs import EVENTS, FIELDS, escape, json_observer, json_record
from tests.helpers import Daemon

#: every key a JSON line may have, and the type of each
SCHEMA: dict[str, type] = {
    "time": str,
    "level": str,
    "service": str,
    "event": str,
    "text": str,
    **FIELDS,
    "worker": int,
    "traceback": str,
}
CORE = ("time", "level", "service", "event", "text")
CONNECTION = ("peer", "duration", "bytes_in", "bytes_out", "outcome")
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
LEVELS = {"debug", "info", "warn", "error", "critical"}
OUTCOMES = {
    "closed",
    "lost",
    "evicted",
    "idle timeout",
    "request timeout",
    "handshake timeout",
}


def check_schema(record: dict[str, Any]) -> None:
    """A JSON line has the core keys and only keys of the schema, typed."""
    assert set(CORE) <= set(record), record
    assert set(record) <= set(SCHEMA), set(record) - set(SCHEMA)
    for key, value in record.items():
        assert type(value) is SCHEMA[key], (key, value)
    assert RFC3339_UTC.match(record["time"]), record["time"]
    assert record["level"] in LEVELS
    assert record["event"] in EVENTS
    if record["event"] == "connection":
        assert set(CONNECTION) <= set(record), record
        assert record["outcome"] in OUTCOMES
        assert record["duration"] >= 0
        assert record["bytes_in"] >= 0 and record["bytes_out"] >= 0


def twisted_event(**fields: Any) -> dict[str, Any]:
    """An event as twisted.logger hands it to observers."""
    event: dict[str, Any] = {
        "log_logger": Logger(),
        "log_level": LogLevel.info,
        "log_namespace": "sockd",
        "log_source": None,
        "log_format": "{service}: {peer} disconnected: {outcome}",
        "log_time": 1_700_000_000.25,
    }
    event.update(fields)
    return event


class TestJsonRecord:
    def test_connection_line(self) -> None:
        record = json_record(
            twisted_event(
                event="connection",
                service="echo",
                peer="[2001:db8::1]:41234",
                duration=0.5,
                bytes_in=12,
                bytes_out=14,
                outcome="closed",
            )
        )
        assert record == {
            "time": "2023-11-14T22:13:20.250Z",
            "level": "info",
            "service": "echo",
            "event": "connection",
            "text": "echo: [2001:db8::1]:41234 disconnected: closed",
            "peer": "[2001:db8::1]:41234",
            "duration": 0.5,
            "bytes_in": 12,
            "bytes_out": 14,
            "outcome": "closed",
        }

    def test_twisted_internals_and_undeclared_fields_left_out(self) -> None:
        record = json_record(
            twisted_event(
                log_format="twistd {version} starting",
                log_namespace="twisted.scripts._twistd_unix.UnixAppLogger",
                version="24.3",
                isError=0,
                message=("x",),
                system="-",
            )
        )
        assert record == {
            "time": "2023-11-14T22:13:20.250Z",
            "level": "info",
            "service": "sockd",
            "event": "message",
            "text": "twistd 24.3 starting",
        }

    def test_only_sockd_events_give_fields(self) -> None:
        # Another library's "peer" or "service" is not ours to vouch for.
        record = json_record(
            twisted_event(log_namespace="txredisapi", peer="x", service="redis")
        )
        assert "peer" not in record
        assert record["service"] == "sockd"

    def test_types_are_enforced(self) -> None:
        record = json_record(
            twisted_event(
                peer=b"127.0.0.1",
                bytes_in=True,
                bytes_out="12",
                duration=3,
                requests=2.5,
                event="something else",
            )
        )
        assert record["duration"] == 3.0 and type(record["duration"]) is float
        for dropped in ("peer", "bytes_in", "bytes_out", "requests"):
            assert dropped not in record
        assert record["event"] == "message"
        check_schema(record)

    def test_not_a_number_left_out(self) -> None:
        assert "duration" not in json_record(twisted_event(duration=float("nan")))

    def test_service_from_the_namespace(self) -> None:
        for namespace, service in [
            ("sockd.echo", "echo"),
            ("sockd.file", "file"),
            ("sockd.chat", "chat"),
            ("sockd.notify", "sockd"),
            ("sockd", "sockd"),
        ]:
            event = twisted_event(log_namespace=namespace, log_format="x")
            assert json_record(event)["service"] == service, namespace

    def test_levels_by_name(self) -> None:
        for level in LogLevel.iterconstants():
            record = json_record(twisted_event(log_level=level, log_format="x"))
            assert record["level"] == level.name
        assert json_record(twisted_event(log_level=None))["level"] == "info"

    def test_failure_gives_its_traceback(self) -> None:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            failure = Failure()
        record = json_record(
            twisted_event(log_format="file: SUM failed", log_failure=failure)
        )
        assert record["text"] == "file: SUM failed"
        assert "ZeroDivisionError" in record["traceback"]
        check_schema(record)

    def test_worker_lines_say_which_worker(self) -> None:
        record = json_record(twisted_event(sockd_worker=2, log_format="x"))
        assert record["worker"] == 2

    def test_untrusted_text_stays_escaped_and_valid(self) -> None:
        # As protocols log a client's bytes: through escape().
        hostile = escape(b'evil\r\n{"level": "error"}\x1b[2J\xff')
        record = json_record(
            twisted_event(
                log_format="file: {peer} {path}: 404",
                peer="127.0.0.1",
                path=hostile,
                request="GET " + "bad\udcff",
            )
        )
        assert record["text"] == (
            'file: 127.0.0.1 evil\\r\\n{"level": "error"}\\x1b[2J\\xff: 404'
        )
        assert record["request"] == "GET bad\\udcff"


def test_observer_writes_one_ascii_json_object_per_line() -> None:
    out = io.StringIO()
    observer = json_observer(out)
    observer(twisted_event(log_format="caf\u00e9\nsecond line"))
    observer(twisted_event(event="connection", log_format="x", peer="1.2.3.4:5"))
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == 3
    assert all(line.isascii() for line in lines)
    first, second = (json.loads(line) for line in lines[:2])
    assert first["text"] == "caf\u00e9\nsecond line"
    assert (second["event"], second["peer"]) == ("connection", "1.2.3.4:5")


def test_deploy_doc_documents_exactly_the_schema() -> None:
    text = (Path(__file__).parents[2] / "docs" / "deploy.md").read_text()
    section = text.split("### Logs", 1)[1].split("\n### ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE))
    assert documented == set(SCHEMA)
    examples = re.findall(r"^(\{.*\})$", section, re.MULTILINE)
    assert examples
    for example in examples:
        check_schema(json.loads(example))


# A real daemon --------------------------------------------------------------


class JSONDaemon(Daemon):
    """twistd with the JSON logger; ports are read from the JSON lines."""

    LISTEN = re.compile(r'"text": "(\w+): listening on (TCP|UDP|UNIX) ([^"\s]+)"')

    def command(self) -> list[str]:
        command = super().command()
        at = command.index(self.tapname)
        command[at:at] = ["--logger", "sockd.logs.json_observer"]
        return command

    def records(self) -> list[dict[str, Any]]:
        """Every line of the log, each parsed as JSON (a line that is not fails)."""
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def json_daemon(tmp_path: Path) -> Iterator[JSONDaemon]:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_bytes(b"hello\n")
    daemon = JSONDaemon(
        "sockd",
        f"""
        [echo]
        listen = tcp:0:interface=127.0.0.1
        listen_udp =
        [chat]
        enabled = false
        [file]
        enabled = true
        listen = tcp:0:interface=127.0.0.1
        root = {root}
        """,
        directory=tmp_path,
    )
    try:
        yield daemon.start()
    finally:
        daemon.stop()


def exchange(port: int, data: bytes) -> tuple[int, bytes]:
    """Send, half-close, read to the end; (our port, the answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        ours = s.getsockname()[1]
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return ours, answer


@pytest.mark.integration
def test_real_daemon_logs_the_schema_one_line_per_echo_connection(
    json_daemon: JSONDaemon,
) -> None:
    port = json_daemon.port("echo")
    # Telnet refusals are written too; 96 KiB take many reads.
    sent = [b"hello\n", b"one\r\ntwo\n\xff\xfd\x01", (b"x" * 8000 + b"\n") * 12]
    seen = {}
    for data in sent:
        ours, answer = exchange(port, data)
        seen[ours] = (len(data), len(answer))
        json_daemon.wait_for(rf'"peer": "127\.0\.0\.1:{ours}"')
    records = json_daemon.records()
    for record in records:
        check_schema(record)
    # Nothing of Twisted's bookkeeping, whatever the line.
    assert not any(key.startswith("log_") for record in records for key in record)
    echo = [r for r in records if r["service"] == "echo"]
    ended = [r for r in echo if r["event"] == "connection"]
    # The listening line, then exactly one line per connection.
    assert len(echo) == 1 + len(sent)
    assert {r["peer"]: (r["bytes_in"], r["bytes_out"]) for r in ended} == {
        f"127.0.0.1:{ours}": counts for ours, counts in seen.items()
    }
    assert {r["outcome"] for r in ended} == {"closed"}


@pytest.mark.integration
def test_real_daemon_logs_one_line_per_file_connection(
    json_daemon: JSONDaemon,
) -> None:
    port = json_daemon.port("file")
    requests = [b"a.txt\n", b"STAT a.txt\r\nGET a.txt\r\nQUIT\r\n"]
    seen = {}
    for data in requests:
        ours, answer = exchange(port, data)
        assert answer.endswith(b"hello\n") or answer.endswith(b"OK bye\r\n")
        seen[ours] = (len(data), len(answer))
        json_daemon.wait_for(rf'"peer": "127\.0\.0\.1:{ours}"')
    records = json_daemon.records()
    for record in records:
        check_schema(record)
    served = [r for r in records if r["service"] == "file"][1:]  # after listening
    assert [r["event"] for r in served] == ["connection"] * len(requests)
    assert {r["peer"]: (r["bytes_in"], r["bytes_out"]) for r in served} == {
        f"127.0.0.1:{ours}": counts for ours, counts in seen.items()
    }
    assert [r["request"] for r in served] == ["bare a.txt", "GET a.txt"]
