"""Typed application builders: each binds deployments into one Serve graph."""
