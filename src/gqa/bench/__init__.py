"""Benchmarks with provenance: attention (``gqa bench attention``) and generation.

Submodules are imported on use so that ``import gqa.bench`` stays cheap and never fails.
"""
