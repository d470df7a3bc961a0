"""Ray Serve deployments of maas-cluster: one model (or the HTTP ingress) per module."""
