"""Input readers. Each module has a config dataclass and a source class with `plan` and `read`."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from pipelines.sources.base import Source
from pipelines.sources.coco import CocoConfig, CocoSource
from pipelines.sources.hf_dataset import HfDatasetConfig, HfDatasetSource
from pipelines.sources.image_folder import ImageFolderConfig, ImageFolderSource
from pipelines.sources.video_folder import VideoFolderConfig, VideoFolderSource
from pipelines.sources.wds_shards import WdsConfig, WdsSource

# type name -> (config dataclass, source class); read-only.
SOURCE_TYPES = MappingProxyType({
    "coco": (CocoConfig, CocoSource),
    "image_folder": (ImageFolderConfig, ImageFolderSource),
    "webdataset": (WdsConfig, WdsSource),
    "hf_dataset": (HfDatasetConfig, HfDatasetSource),
    "video_folder": (VideoFolderConfig, VideoFolderSource),
})


def build_source(cfg: Any) -> Source:
    return SOURCE_TYPES[cfg.type][1](cfg)


__all__ = ["SOURCE_TYPES", "Source", "build_source"]
