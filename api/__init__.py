"""The HTTP layer: one FastAPI app with a router per protocol over the shared dataplane.

``app.build_app`` mounts ``health`` (liveness, readiness), ``v1`` (this service's own API) and ``v2`` (the Open
Inference Protocol); each protocol has its own schemas and renders errors in its own shape
(``problems.Problem``). The ingress deployment (``deployments.ingress``) serves the app.
"""
