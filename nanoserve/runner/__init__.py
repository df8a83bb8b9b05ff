"""Where tensors start: the model runner builds step inputs, runs the model and owns the KV cache."""
