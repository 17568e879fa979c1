"""Hogwild! Inference engine: several workers of one model over one shared KV cache.

Importing this package (and its torch-free modules `config`, `events`, `errors`) loads no torch,
so the HTTP service can share the request and event types without holding the model.
"""
