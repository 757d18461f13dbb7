"""The models: tokenizer and presets, model kinds (causal, value, PMOE), forward passes,
tensor parallelism, offload."""
