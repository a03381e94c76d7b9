"""sockd: hardened Twisted daemons for line echo, UDP chat and file serving."""

__version__ = "0.1.0"

__all__ = ["__version__"]
