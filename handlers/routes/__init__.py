"""The HTTP side: the stream routes, request validation, access control, operations and the page."""
