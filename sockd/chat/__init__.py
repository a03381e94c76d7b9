"""
The chat service: a UDP relay with rooms, optionally federated over
Redis.
"""
