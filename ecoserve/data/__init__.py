"""Bundled traces (Azure LLM inference 2023, CC-BY) and workload loaders (ShareGPT, HumanEval, synthetic)."""
