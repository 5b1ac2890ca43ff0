"""The REST API (SPEC 7): a Falcon app built by ``web.app.create_app``."""

__all__ = ["app", "errors", "middleware", "openapi", "parsing", "resources"]
