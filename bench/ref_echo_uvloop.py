"""
Reference: L{bench.ref_echo_asyncio}, the same code, on uvloop (the C event
loop over libuv).  Needs the C{bench} extra; exits with status 3 and says so
when uvloop is not installed.

    python -m bench.ref_echo_uvloop [--raw] [--port N]
"""

from __future__ import annotations

import sys

from bench import ref_echo_asyncio

if __name__ == "__main__":
    try:
        import uvloop  # noqa: F401
    except ImportError:
        print("uvloop is not installed: pip install -e '.[bench]'", file=sys.stderr)
        sys.exit(3)
    ref_echo_asyncio.main(uvloop=True)
