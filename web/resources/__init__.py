"""One module per URL family of the REST API (SPEC 7)."""

__all__ = ["events", "executions", "hooks", "runs", "system", "workflows"]
