"""Trainer core."""
