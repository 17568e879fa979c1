"""HTTP service for Hogwild! Inference: a FastAPI app in front of an engine that runs in its own process.

The API process never imports torch; only the spawned engine process (service.engine_process) loads the engine.
"""
