"""The paged KV cache's bookkeeping: which block holds which tokens. Pure Python, no torch."""
