"""
The file service: a jailed file server for netcat, Gopher and a framed
protocol.
"""
