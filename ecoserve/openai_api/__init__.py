"""The OpenAI-compatible HTTP front door (DESIGN §10): its own process, a FastAPI app that talks
to the coordinator through the async ZeroMQ client (`ecoserve serve --http-port PORT`)."""
