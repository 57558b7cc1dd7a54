"""tunelab: fine-tuning recipe runner for LLMs."""

__version__ = "0.1.0"
