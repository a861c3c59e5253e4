"""Shared pytest fixtures: real services live in tests/support/ and are imported here."""
