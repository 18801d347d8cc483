"""Verdicts out to the line: one versioned message per inspection (``message``), kept in a durable
outbox and delivered at least once, in order, by a sink (``mqtt``)."""
