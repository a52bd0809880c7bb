"""Contracts between stages: the trial configuration and the table schemas."""
