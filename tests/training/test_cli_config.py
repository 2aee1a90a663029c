"""The training CLI takes data.sample's image sizes from the model preset: a run cannot feed the model
images of other sizes than its preset was built for."""

from __future__ import annotations

import pytest

from tests.training.cli import CONFIGS
from training.__main__ import main

# The tiny preset's sizes, written out (anystory/presets.py: resolution, clip_image_size, ref_size).
TINY = {"resolution": 64, "clip_size": 32, "ref_size": 64}


def _args(*extra: str) -> list[str]:
    return ["-c", str(CONFIGS / "tiny_stage1.yaml"), "--data.train_shards=[nowhere]", "--trainer.logger=false",
            "--trainer.callbacks=[]", *extra]


@pytest.mark.parametrize("extra", [(), ("--data.sample=null",), ("--data.sample.resolution=64",)])
def test_sizes_come_from_the_preset(extra):
    # shipped config (no sizes written), no sample section at all, a size equal to the preset's
    sample = main(_args(*extra), run=False).datamodule.sample
    assert {key: getattr(sample, key) for key in TINY} == TINY
    assert sample.max_subjects == (1 if not extra or extra[0] != "--data.sample=null" else 4)


# 224: SampleConfig's default, written: still not the tiny preset's
@pytest.mark.parametrize(("key", "value"), [("resolution", 128), ("clip_size", 224), ("ref_size", 32)])
def test_a_size_other_than_the_presets_is_rejected(key, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(_args(f"--data.sample.{key}={value}"), run=False)
    assert exit_.value.code == 2
    field = {"clip_size": "clip_image_size"}.get(key, key)
    # (the line before it, if any, is Lightning's warning that pytest's own argv is not the CLI's)
    assert capsys.readouterr().err.splitlines()[-1] == (f"python -m training: error: data.sample.{key}: {value} is not the {field} of "
                                       f"model preset 'tiny' ({TINY[key]}); leave it out: it is derived from the preset")
