"""Scoring a detector on a dataset: exact metrics, the resumable runner, tables, the HTML report."""
