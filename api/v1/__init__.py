"""This service's own API (``/v1``): JSON or multipart in, ``{"detail": [...]}`` errors out."""
