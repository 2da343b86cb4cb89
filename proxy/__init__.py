"""shadow-proxy: a shadow-deployment and canary proxy for inference endpoints."""

__version__ = "0.1.0"
