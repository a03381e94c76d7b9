"""
The echo service: line, raw (RFC 862) and UDP echo.
"""
