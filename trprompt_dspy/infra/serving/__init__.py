"""Local vLLM servers: one per base model, LoRA adapters hot-swapped, DSPy LMs pointed at them."""
