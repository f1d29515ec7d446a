"""Flower ServerApp: strategy, DP, SecAgg+, privacy budgets, checkpoints."""
