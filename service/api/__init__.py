"""The web layer: the FastAPI app factory, routes, request/response schemas, the WebSocket protocol."""
