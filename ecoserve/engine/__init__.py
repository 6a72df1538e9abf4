"""Single-process offline engine: LLM, engine, FCFS batcher, sequence, model runner, and the simulated runner behind `--engine sim`."""
