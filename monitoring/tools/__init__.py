"""Command-line tools of the monitoring: reference profiles, demo traffic, dashboard snapshots."""
