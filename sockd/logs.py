"""
The log observers named on twistd's command line:
C{twistd --logger sockd.logs.journal_observer} (or json_observer).
"""

from sockd.core.logs import journal_observer, json_observer

__all__ = ["journal_observer", "json_observer"]
