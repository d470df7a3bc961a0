"""Offline work submitted to the cluster as Ray jobs."""
