"""Split federated learning (HERON-SFL): datasets and partitions, roles, the round loop, checkpoints."""
