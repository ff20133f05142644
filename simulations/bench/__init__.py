"""Simulation-speed benchmark: the same federated workload run by several frameworks."""
