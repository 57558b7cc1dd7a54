"""Data stage: sources, formats, chat templates, label masking, batching."""
