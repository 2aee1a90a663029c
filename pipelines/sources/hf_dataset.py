"""A Hugging Face `datasets` dataset from a local path (saved with `save_to_disk`, or data files).

Images are read as encoded bytes (`Image(decode=False)`) so decoding and its rejections happen in
the decode stage like every other source. Shards are row ranges, so planning only counts rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipelines.sources.base import SourceError, chunk, image_record, require


@dataclass
class HfDatasetConfig:
    name: str
    path: str  # local directory
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "caption"
    labels_column: str | None = None
    annotations_column: str | None = None  # list of COCO-style dicts per row
    type: str = "hf_dataset"


class HfDatasetSource:
    media = "image"

    def __init__(self, cfg: HfDatasetConfig):
        self.cfg = cfg
        self.name = cfg.name

    def _open(self):
        import datasets  # heavy import, only where used

        require(self.cfg.path, "path")
        if os.path.exists(os.path.join(self.cfg.path, "state.json")) or os.path.exists(
            os.path.join(self.cfg.path, "dataset_dict.json")
        ):
            ds = datasets.load_from_disk(self.cfg.path)
            if isinstance(ds, datasets.DatasetDict):
                if self.cfg.split not in ds:
                    raise SourceError(f"split: {self.cfg.path} has no split {self.cfg.split!r} (has {list(ds)})")
                ds = ds[self.cfg.split]
        else:
            try:
                ds = datasets.load_dataset(self.cfg.path, split=self.cfg.split)
            except ValueError as err:  # e.g. no such split
                raise SourceError(f"split: {self.cfg.path}: {err}") from err
        if self.cfg.image_column not in ds.column_names:
            raise SourceError(f"image_column: {self.cfg.path} has no column {self.cfg.image_column!r}"
                              f" (has {ds.column_names})")
        if isinstance(ds.features[self.cfg.image_column], datasets.Image):
            ds = ds.cast_column(self.cfg.image_column, datasets.Image(decode=False))
        return ds

    def plan(self, units_per_shard: int) -> list[list[int]]:
        return chunk(list(range(len(self._open()))), units_per_shard)

    def read(self, units: list[int]) -> Iterator[dict[str, Any]]:
        ds = self._open().select(units)
        for idx, row in zip(units, ds, strict=True):
            value = row[self.cfg.image_column]
            data = value.get("bytes") if isinstance(value, dict) else value
            if data is None and isinstance(value, dict) and value.get("path"):
                try:
                    with open(value["path"], "rb") as f:
                        data = f.read()
                except OSError:
                    data = None
            labels = row.get(self.cfg.labels_column) if self.cfg.labels_column else None
            anns = row.get(self.cfg.annotations_column) if self.cfg.annotations_column else None
            yield image_record(f"row{idx}", data, None if data is not None else "read_error",
                               str(row.get(self.cfg.caption_column) or ""), labels, anns)
