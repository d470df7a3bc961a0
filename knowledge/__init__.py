"""What the cluster knows beside its models: the WordNet graph over the vision model's classes, and the rules
that check what the models say. Pure Python, free of Ray: the dataplane calls it."""
