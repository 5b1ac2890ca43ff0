"""actors package."""

__all__: list[str] = []
