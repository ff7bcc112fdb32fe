"""Helpers shared by test modules (import as `from helpers.daemons import ...`)."""
