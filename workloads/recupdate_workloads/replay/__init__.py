"""Offline replay of update strategies over historical data, and the drift analysis."""
