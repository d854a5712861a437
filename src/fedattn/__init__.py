"""fedattn: Federated Attention for collaborative, privacy-preserving LLM inference."""

__version__ = "0.1.0"
