"""Low-bit weights: options, quantizer, hub formats, nanoserve's packed layout and the layers that use it."""
