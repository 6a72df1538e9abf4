"""Llama-family models: HF config + safetensors loading, the paged forward pass, sampling, and the model registry (tiny-llama, smollm2-135m, local folders)."""
