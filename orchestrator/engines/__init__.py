"""What calls run with: DeepSpeed training, transformers' generate and vLLM."""
