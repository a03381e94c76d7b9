"""
Build the sdist and wheel with C{make dist}, install the wheel into a fresh
venv (not editable), and check that twistd sees every plugin, that nothing
of Twisted's own is overwritten, and that what the units name is installed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, TWISTD

pytestmark = pytest.mark.integration

TAPNAMES = ("sockd", "sockd-echo", "sockd-chat", "sockd-file")


@pytest.fixture(scope="module")
def dist() -> Iterator[Path]:
    """What C{make dist} writes, run in a copy of what it reads."""
    out = Path(tempfile.mkdtemp(prefix="sockd-dist-"))
    # A copy, so a stale build/ or egg-info, or files other tests create
    # meanwhile, cannot leak in.
    src = out / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "Makefile"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "dropin.cache")
    for tree in ("sockd", "twisted", "docs", "tests"):
        shutil.copytree(ROOT / tree, src / tree, ignore=skip)
    # make's venv is this interpreter's (build, setuptools and wheel are
    # test dependencies), marked as set up so that make runs no pip.
    venv = out / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    (venv / ".installed-build").touch()
    made = subprocess.run(
        ["make", "-C", str(src), "dist", f"VENV={venv}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    assert "pip install" not in made.stdout
    yield src / "dist"
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    (built,) = dist.glob("sockd-*.whl")
    return built


def test_dist_is_an_sdist_and_the_wheel_built_from_it(dist: Path) -> None:
    (sdist,) = dist.glob("sockd-*.tar.gz")
    assert sorted(p.name for p in dist.iterdir()) == sorted(
        [sdist.name, sdist.name.removesuffix(".tar.gz") + "-py3-none-any.whl"]
    )
    with tarfile.open(sdist) as archive:
        names = [n.partition("/")[2] for n in archive.getnames()]
    for needed in ("setup.cfg", "README.md", "docs/deploy.md", "sockd/data/sockd.ini"):
        assert needed in names
    assert "twisted/plugins/sockd_plugins.py" in names
    assert not [n for n in names if n.startswith("tests")]


def test_wheel_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/sockd_plugins.py" in names
    assert "sockd/data/sockd.ini" in names
    assert "sockd/py.typed" in names
    assert any(n.startswith("sockd/data/files/") for n in names)
    # What the units' Documentation= names, installed beside the venv's bin/.
    docs = [n.partition(".data/data/")[2] for n in names if ".data/data/" in n]
    assert "share/doc/sockd/deploy.md" in docs
    forbidden = [
        n
        for n in names
        if n in ("twisted/__init__.py", "twisted/plugins/__init__.py")
        or n.endswith("dropin.cache")
        or n.startswith("tests/")
    ]
    assert forbidden == []


def test_installed_wheel_shows_plugins(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # Dependencies come from the test environment (a plain path entry: its
    # own .pth files, such as the editable checkout, are not processed).
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        timeout=120,
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SOCKD_CONFIG")
    }
    where = subprocess.run(
        [
            python,
            "-c",
            "import sockd, twisted.plugins.sockd_plugins as p; "
            "print(sockd.__file__); print(p.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
        check=True,
    )
    for line in where.stdout.split():
        assert line.startswith(str(site)), where.stdout
    result = subprocess.run(
        [python, "-c", TWISTD[2], "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert result.returncode == 0
    for name in TAPNAMES:
        assert f"    {name} " in result.stdout
    assert result.stderr == ""
    # The units' Documentation= names a file of their venv, /opt/sockd.
    for unit in sorted((ROOT / "etc" / "systemd").glob("sockd*.s*")):
        (url,) = re.findall(r"(?m)^Documentation=(\S+)$", unit.read_text())
        assert url.startswith("file:///opt/sockd/"), unit.name
        assert (venv / url.removeprefix("file:///opt/sockd/")).is_file(), url
    # The packaged default configuration loads from the installed package.
    loaded = subprocess.run(
        [
            python,
            "-c",
            "from sockd.core import config; c = config.load(None, "
            "environ={}); print(c.source)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    if os.path.exists("/etc/sockd/sockd.ini"):
        return
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip().startswith(str(site)), loaded.stdout
