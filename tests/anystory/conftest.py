from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from anystory.components import BaseComponents, build_random
from anystory.config import AnyStoryConfig
from anystory.model import AnyStoryModel
from anystory.presets import get_preset


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenizer")


@pytest.fixture
def tiny_config() -> AnyStoryConfig:
    return get_preset("tiny")


@pytest.fixture
def components(tiny_config: AnyStoryConfig, tokenizer_dir: Path) -> BaseComponents:
    return build_random(tiny_config, tokenizer_dir, seed=0)


@pytest.fixture
def plain_unet(components: BaseComponents):
    """An unpatched copy of the UNet, taken before AnyStory installs its processors."""
    return copy.deepcopy(components.unet)


@pytest.fixture
def model(tiny_config: AnyStoryConfig, components: BaseComponents, plain_unet) -> AnyStoryModel:
    torch.manual_seed(0)
    return AnyStoryModel(tiny_config, components.unet, components.image_encoder).eval()
