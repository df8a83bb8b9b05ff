"""Tensor parallelism: process groups, worker processes, and the KV capacity agreement."""
