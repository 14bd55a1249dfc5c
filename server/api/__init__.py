"""The HTTP edge: app factory, routes, schemas, auth, limits, metrics, errors -> HTTP, streaming."""
