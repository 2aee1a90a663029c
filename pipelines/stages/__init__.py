"""Batch transformations: each a callable class, `__call__(batch) -> batch`, no Ray and no I/O."""
