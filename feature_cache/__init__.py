"""Feature platform: catalog, offline store, point-in-time joins, online store, materialization."""

__all__: list[str] = []
