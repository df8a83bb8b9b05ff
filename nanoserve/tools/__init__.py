"""Commands built on the core, not part of it: ``verify`` (parity with transformers), ``plan`` (what fits per
rank), ``bench`` (throughput / latency / prefill), ``demo`` (the built-in checkpoint)."""
