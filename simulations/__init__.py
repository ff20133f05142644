"""Local federated simulations, comparisons and benchmarks."""
