"""Fault tests (issue 6): crash soak, secrets, hostile input and load against a real daemon."""

__all__: list[str] = []
