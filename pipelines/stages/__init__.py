"""Batch transformations: each a callable class, `__call__(batch) -> batch`, no Ray and no I/O.

Reading a shard's inputs and writing the shard are not stages: pipelines/runner.py types them as its
`Source` and `Sink`.
"""

from typing import Protocol

from pipelines.batch import Batch


class Stage(Protocol):
    def __call__(self, batch: Batch) -> Batch: ...
