"""The C{sockd} command and its subcommands."""
