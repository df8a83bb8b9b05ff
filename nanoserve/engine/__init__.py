"""Requests, scheduling and the engine loop (no torch below the runner boundary)."""
