"""Single-process offline engine: sequences, a local FCFS continuous batcher and the step loop behind `LLM`."""
