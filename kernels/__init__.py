"""Fused Triton LoRA kernels with plain-PyTorch references (see issue: kernels).

Imported as ``tunelab.kernels``; never as a top-level ``kernels`` package.
"""
