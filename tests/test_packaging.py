"""
Build the wheel, install it into a fresh venv (not editable), and check that
twistd sees every plugin and that nothing of Twisted's own is overwritten.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, TWISTD

pytestmark = pytest.mark.integration

TAPNAMES = ("sockd", "sockd-echo", "sockd-chat", "sockd-file")


@pytest.fixture(scope="module")
def wheel() -> Path:
    out = Path(tempfile.mkdtemp(prefix="sockd-wheel-"))
    # Build from a copy of what a build reads, so a stale build/ or
    # egg-info, or files other tests create meanwhile, cannot leak in.
    src = out / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "dropin.cache")
    shutil.copytree(ROOT / "sockd", src / "sockd", ignore=skip)
    shutil.copytree(ROOT / "twisted", src / "twisted", ignore=skip)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    (built,) = out.glob("sockd-*.whl")
    yield built
    shutil.rmtree(out, ignore_errors=True)


def test_wheel_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/sockd_plugins.py" in names
    assert "sockd/data/sockd.ini" in names
    assert "sockd/py.typed" in names
    assert any(n.startswith("sockd/data/files/") for n in names)
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
