"""Latency anatomy: time to first token, time per output token, tokens, and who made a
breach (README "Latency anatomy")."""
