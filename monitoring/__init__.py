"""Monitoring: metrics, Prometheus and dashboards for the cluster."""
