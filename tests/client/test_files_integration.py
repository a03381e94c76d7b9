"""
C{sockd get|ls|stat|put} against a real C{twistd sockd-file} on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sockd.client.main import main
from tests.client.test_files import make_ca, server_pem
from tests.helpers import Daemon, running

pytestmark = pytest.mark.integration

BIG = os.urandom(5 * 1024 * 1024 + 123)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    root = tmp_path_factory.mktemp("root")
    (root / "big.bin").write_bytes(BIG)
    (root / "sub").mkdir()
    (root / "sub" / "a b%.txt").write_bytes(b"odd name\n")
    (root / "hello.txt").write_bytes(b"hello\n")
    (root / "tree" / "deep" / "er").mkdir(parents=True)
    (root / "tree" / "one.txt").write_bytes(b"one\n")
    (root / "tree" / "deep" / "two.bin").write_bytes(BIG[:2_000_000])
    (root / "tree" / "deep" / "er" / "three.txt").write_bytes(b"three\n")
    ini = f"""
        [file]
        enabled = true
        listen = tcp:0:interface=127.0.0.1
        root = {root}
        writable = true
        upload_allow = 127.0.0.1
        """
    with running("sockd-file", ini) as daemon:
        yield daemon, root


def served(daemon: Daemon, last: str) -> tuple[int, int]:
    """
    (bytes out, requests) of the connection whose log line (one per
    connection, at its end) names C{last} as its last request.
    """
    line = daemon.wait_for(rf"(\d+) out, (\d+) requests \(last: {last}\): closed$")
    match = re.search(r"(\d+) out, (\d+) requests", line)
    assert match is not None
    return int(match.group(1)), int(match.group(2))


def address(server: tuple[Daemon, Path]) -> str:
    return f"127.0.0.1:{server[0].port('file')}"


def sockd(capfd: Any, *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as e:
        status = int(e.code or 0)
    out, err = capfd.readouterr()
    return status, out, err


def test_get_then_continue_a_truncated_part(
    server: tuple[Daemon, Path], tmp_path: Path, capfd: Any
) -> None:
    out = tmp_path / "big.bin"
    status, _, err = sockd(capfd, "get", address(server), "big.bin", "-o", str(out))
    assert (status, err) == (0, "")
    assert out.read_bytes() == BIG

    # An interrupted download leaves a prefix in OUT.part.
    out.unlink()
    part = tmp_path / "big.bin.part"
    part.write_bytes(BIG[: 3 * 1024 * 1024 + 7])
    status, _, err = sockd(
        capfd, "get", "--continue", address(server), "/big.bin", "-o", str(out)
    )
    assert (status, err) == (0, "")
    assert out.read_bytes() == BIG
    assert not part.exists()
    # Only the missing tail crossed the network (and two answer lines).
    sent, requests = served(server[0], r"GET /big\.bin")
    tail = len(BIG) - (3 * 1024 * 1024 + 7)
    assert requests == 1 and tail < sent < tail + 512


def test_ls_and_stat(server: tuple[Daemon, Path], capfd: Any) -> None:
    status, out, _ = sockd(capfd, "ls", address(server))
    assert status == 0
    assert {"big.bin", "hello.txt", "sub/"} <= set(out.splitlines())
    status, out, _ = sockd(capfd, "ls", "-l", address(server), "sub")
    assert status == 0
    assert out.startswith("f              9 ") and out.endswith(" a b%.txt\n")
    status, out, _ = sockd(capfd, "stat", "--sum", address(server), "sub/a b%.txt")
    assert status == 0
    assert "type:   file\nsize:   9\n" in out
    assert hashlib.sha256(b"odd name\n").hexdigest() in out


def test_ls_a_file_with_human_sizes(server: tuple[Daemon, Path], capfd: Any) -> None:
    status, out, err = sockd(capfd, "ls", address(server), "sub/a b%.txt")
    assert (status, out, err) == (0, "sub/a b%.txt\n", "")
    status, out, _ = sockd(capfd, "ls", "-lh", f"sockd://{address(server)}/big.bin")
    assert status == 0
    assert out.startswith("f  5.1M ") and out.endswith(" /big.bin\n")
    # A directory is still listed, and a missing name still not found.
    assert sockd(capfd, "ls", address(server), "sub")[:2] == (0, "a b%.txt\n")
    assert sockd(capfd, "ls", address(server), "nope")[0] == 4


def test_put_refusals_from_the_server(
    server: tuple[Daemon, Path], tmp_path: Path, capfd: Any
) -> None:
    local = tmp_path / "up.txt"
    local.write_bytes(b"up\n")
    status, _, err = sockd(capfd, "put", address(server), str(local), "nodir/up.txt")
    assert status == 4
    assert err.startswith("sockd put: no such directory: nodir (server error 404")
    status, _, err = sockd(capfd, "put", address(server), str(local), "sub/.up")
    assert status == 5
    assert err.startswith("sockd put: hidden names are refused by the server: .up ")
    assert not (server[1] / "nodir").exists()
    assert not (server[1] / "sub" / ".up").exists()


def test_errors_map_to_exit_statuses(
    server: tuple[Daemon, Path],
    tmp_path: Path,
    capfd: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    for path, status in [("missing", 4), ("../etc/passwd", 5), ("sub", 7)]:
        got, _, err = sockd(capfd, "get", address(server), path)
        assert got == status, err
    assert os.listdir(tmp_path) == []


def test_put_round_trip_and_no_overwrite(
    server: tuple[Daemon, Path], tmp_path: Path, capfd: Any
) -> None:
    local = tmp_path / "up load.bin"
    local.write_bytes(BIG[:1_000_001])
    status, _, err = sockd(capfd, "put", address(server), str(local), "sub/")
    assert (status, err) == (0, "")
    assert (server[1] / "sub" / "up load.bin").read_bytes() == BIG[:1_000_001]
    # The server keeps existing files unless overwrite is on: ERR 409.
    status, _, err = sockd(capfd, "put", address(server), str(local), "sub/")
    assert status == 7
    assert "409" in err


def test_tls_against_the_daemon(tmp_path: Path, capfd: Any) -> None:
    ca = make_ca("sockd integration CA")
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    pem = server_pem(tmp_path / "server.pem", ca, [x509.DNSName("localhost")])
    root = tmp_path / "root"
    root.mkdir()
    (root / "t.txt").write_bytes(b"over TLS\n")
    ini = f"""
        [file]
        enabled = true
        listen = ssl:0:interface=127.0.0.1:privateKey={pem}
        root = {root}
        """
    with running("sockd-file", ini) as daemon:
        port = daemon.port("file")
        out = tmp_path / "t.txt"
        status, _, err = sockd(
            capfd,
            "get",
            "--cafile",
            str(cafile),
            f"localhost:{port}",
            "t.txt",
            "-o",
            str(out),
        )
        assert (status, err) == (0, "")
        assert out.read_bytes() == b"over TLS\n"
        # The certificate names localhost, not 127.0.0.1.
        status, _, err = sockd(
            capfd, "ls", "--cafile", str(cafile), f"127.0.0.1:{port}"
        )
        assert status == 6
        assert "certificate not accepted" in err


def test_console_script_exit_status(server: tuple[Daemon, Path]) -> None:
    # The real process, as a shell script sees it.
    result = subprocess.run(
        [sys.executable, "-m", "sockd.client.main", "stat", address(server), "nope"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 4
    assert result.stderr == b"sockd stat: server error 404: not found\n"


# URLs: sockd://, gopher://, -r ------------------------------------------------


def test_sockd_url(server: tuple[Daemon, Path], tmp_path: Path, capfd: Any) -> None:
    url = f"sockd://{address(server)}/sub/a%20b%25.txt"
    status, _, err = sockd(capfd, "get", url, "-o", str(tmp_path))
    assert (status, err) == (0, "")
    assert (tmp_path / "a b%.txt").read_bytes() == b"odd name\n"


def test_gopher_fetches_what_curl_fetches(
    server: tuple[Daemon, Path], tmp_path: Path, capfd: Any
) -> None:
    base = f"gopher://{address(server)}"
    status, _, err = sockd(capfd, "get", f"{base}/0/hello.txt", "-o", str(tmp_path))
    assert (status, err) == (0, "")
    assert (tmp_path / "hello.txt").read_bytes() == b"hello\n"
    status, _, err = sockd(capfd, "get", f"{base}/9/big.bin", "-o", str(tmp_path))
    assert (status, err) == (0, "")
    assert (tmp_path / "big.bin").read_bytes() == BIG
    menu = tmp_path / "menu"
    status, _, err = sockd(capfd, "get", f"{base}/", "-o", str(menu))
    assert (status, err) == (0, "")
    port = server[0].port("file")
    line = f"0hello.txt\t/hello.txt\t127.0.0.1\t{port}\r\n".encode()
    assert line in menu.read_bytes()
    curl = shutil.which("curl")
    if curl is not None:
        for path, local in (("/0/hello.txt", "hello.txt"), ("/", "menu")):
            fetched = subprocess.run(
                [curl, "-sS", "--max-time", "20", f"{base}{path}"],
                capture_output=True,
                timeout=30,
                check=True,
            ).stdout
            assert fetched == (tmp_path / local).read_bytes()


def test_gopher_missing_selector(
    server: tuple[Daemon, Path], tmp_path: Path, capfd: Any
) -> None:
    url = f"gopher://{address(server)}/0/missing.txt"
    status, _, err = sockd(capfd, "get", url, "-o", str(tmp_path / "m"))
    # The server answers a Gopher selector it cannot serve with an error
    # item (3404 not found): exit 4.
    assert status == 4, err
    assert list(tmp_path.iterdir()) == []


def test_recursive_resumes_and_skips_identical(
    server: tuple[Daemon, Path], tmp_path: Path, capfd: Any
) -> None:
    daemon, root = server
    out = tmp_path / "out"
    (out / "deep").mkdir(parents=True)
    (out / "one.txt").write_bytes(b"one\n")  # identical: skipped
    (out / "deep" / "two.bin.part").write_bytes(BIG[:1_500_000])
    url = f"sockd://{address(server)}/tree"
    status, _, err = sockd(capfd, "get", "-r", "-c", url, "-o", str(out))
    assert (status, err) == (0, "")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "deep",
        "deep/er",
        "deep/er/three.txt",
        "deep/two.bin",
        "one.txt",
    ]
    for path in ("one.txt", "deep/two.bin", "deep/er/three.txt"):
        assert (out / path).read_bytes() == (root / "tree" / path).read_bytes()
    # One connection: two GETs (three.txt, the tail of two.bin), so one.txt
    # never crossed the network, and of two.bin only the missing tail did
    # (beside the listings and the answer lines).
    sent, requests = served(daemon, r"GET /tree/deep/\S+")
    tail = 2_000_000 - 1_500_000 + len(b"three\n")
    assert requests == 2 and tail < sent < tail + 4096


# http:// and https:// against nginx ----------------------------------------


def _nginx() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, 1)),
        None,
    )
    if found is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    return found


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """
    nginx serving a directory over http and https on 127.0.0.1.  The test
    binds the listening sockets and nginx inherits them (its C{NGINX}
    variable), so the ports are known and accept at once.
    """
    binary = _nginx()
    base = tmp_path_factory.mktemp("nginx")
    www = base / "www"
    (www / "dir").mkdir(parents=True)
    (www / "big.bin").write_bytes(BIG)
    (www / "hello.txt").write_bytes(b"hello over http\n")
    status = main(["cert", "localhost", "--out-dir", str(base)])
    assert status == 0
    sockets = []
    for _ in range(2):
        listener = socket.create_server(("127.0.0.1", 0))
        sockets.append(listener)
    http_port, https_port = (s.getsockname()[1] for s in sockets)
    user = "user root;" if os.geteuid() == 0 else ""
    temps = "\n".join(
        f"    {kind}_temp_path {base / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (base / "nginx.conf").write_text(
        f"""
daemon off;
{user}
worker_processes 1;
pid {base / "nginx.pid"};
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
{temps}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{http_port};
        root {www};
    }}
    server {{
        listen 127.0.0.1:{https_port} ssl;
        ssl_certificate {base / "cert.pem"};
        ssl_certificate_key {base / "key.pem"};
        root {www};
    }}
}}
"""
    )
    fds = [s.fileno() for s in sockets]
    with open(base / "stderr", "wb") as log:
        process = subprocess.Popen(
            [binary, "-p", str(base), "-c", str(base / "nginx.conf"), "-e", "stderr"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=fds,
            env={**os.environ, "NGINX": "".join(f"{fd};" for fd in fds)},
        )
    for listener in sockets:
        listener.close()
    try:
        yield {
            "http": f"http://127.0.0.1:{http_port}",
            "https": f"https://localhost:{https_port}",
            "https_ip": f"https://127.0.0.1:{https_port}",
            "cafile": str(base / "cert.pem"),
            "www": www,
            "log": base / "stderr",
        }
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _etag(path: Path) -> str:
    # nginx's ETag: hex mtime and hex size.
    info = path.stat()
    return f'"{int(info.st_mtime):x}-{info.st_size:x}"'


def test_http_download_resume_and_errors(
    nginx: dict[str, Any], tmp_path: Path, capfd: Any
) -> None:
    base = nginx["http"]
    out = tmp_path / "big.bin"
    status, _, err = sockd(capfd, "get", f"{base}/big.bin", "-o", str(tmp_path))
    assert (status, err) == (0, ""), nginx["log"].read_text()
    assert out.read_bytes() == BIG

    # --continue of a truncated .part: only the rest is asked for (206).
    out.unlink()
    part = tmp_path / "big.bin.part"
    part.write_bytes(BIG[:3_000_000])
    status, _, err = sockd(capfd, "get", "-c", f"{base}/big.bin", "-o", str(out))
    assert (status, err) == (0, "")
    assert out.read_bytes() == BIG and not part.exists()

    # With the validator of this very version: resumed; of another: whole.
    for etag, warned in ((_etag(nginx["www"] / "big.bin"), False), ('"x"', True)):
        out.unlink()
        part.write_bytes(BIG[:1_000_000] if not warned else b"stale" * 1000)
        (tmp_path / "big.bin.part.meta").write_text(f"If-Range: {etag}\n")
        status, _, err = sockd(capfd, "get", "-c", f"{base}/big.bin", "-o", str(out))
        assert status == 0, err
        assert ("sent the whole file" in err) == warned
        assert out.read_bytes() == BIG
        assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]

    status, _, err = sockd(capfd, "get", f"{base}/missing", "-o", str(tmp_path))
    assert status == 4
    assert "server error 404" in err
    # A directory: redirected to dir/, which nginx forbids listing.
    status, _, err = sockd(capfd, "get", f"{base}/dir", "-o", str(tmp_path / "d"))
    assert status == 5, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


def test_https_with_cacert(nginx: dict[str, Any], tmp_path: Path, capfd: Any) -> None:
    url = f"{nginx['https']}/hello.txt"
    status, _, err = sockd(
        capfd, "get", "--cacert", nginx["cafile"], url, "-o", str(tmp_path)
    )
    assert (status, err) == (0, ""), nginx["log"].read_text()
    assert (tmp_path / "hello.txt").read_bytes() == b"hello over http\n"
    # Not trusted without it; not valid for a name it does not carry.
    status, _, err = sockd(capfd, "get", url, "-o", str(tmp_path / "a"))
    assert status == 6 and "certificate not accepted" in err
    ip_url = f"{nginx['https_ip']}/hello.txt"
    status, _, err = sockd(
        capfd, "get", "--cacert", nginx["cafile"], ip_url, "-o", str(tmp_path / "b")
    )
    assert status == 6 and "certificate not accepted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hello.txt"]
