"""Shard planning, atomic publication and per-shard stats."""
