"""
The shared core: configuration, limits, endpoints, logs, metrics,
systemd notification, service wiring and worker processes.  Imports no
service.
"""
