"""Configuration the training entry points read: `python -m training` takes data.sample's image sizes
from the model preset (a run cannot feed the model images of other sizes than its preset was built
for); `python -m training.evaluate --params` checks train.eval as params.yaml's data section is checked."""

from __future__ import annotations

import pytest

from tests.training.cli import CONFIGS
from training import evaluate
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


@pytest.mark.parametrize(("args", "line"), [
    (("--model.init_args.min_timestep=900", "--model.init_args.max_timestep=100"),
     "model.init_args.min_timestep=900 and max_timestep=100 must satisfy 0 <= min_timestep < max_timestep <= 1000"),
    (("--model.init_args.snr_gamma=0",), "model.init_args.snr_gamma must be > 0 (or null), got 0.0"),
    (("--model.init_args.optimizer=sgd",), "model.init_args.optimizer: 'sgd' is not one of adamw, adamw8bit"),
])
def test_an_out_of_range_model_argument_is_one_line(args, line, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(_args(*args), run=False)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1] == f"python -m training: error: {line}"


class _Parsed(Exception):
    """Raised where evaluation would load the export: the arguments were accepted."""


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ("train:\n  eval:\n    timesteps: [200, 500]\n    max_batches: null\n", None),
        ("other: 1\n", None),  # no train.eval: the options' own defaults
        ("train:\n  eval:\n    batch_sise: 2\n", "error: train.eval.batch_sise: unknown key (allowed: batch_size, "
                                                    "generate_steps, max_batches, max_subjects, timesteps)"),
        ("train:\n  eval:\n    timesteps: [200, soon]\n", "error: train.eval.timesteps: expected int, got 'soon'"),
        ("train:\n  eval:\n    batch_size: null\n", "error: train.eval.batch_size: expected int, got None"),
        ("train: [\n", "error: --params: {params} is not valid YAML"),
    ],
)
def test_evaluate_params_are_checked(section, error, tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text(section)

    def load_export(*args, **kwargs):
        raise _Parsed

    monkeypatch.setattr(evaluate, "load_export", load_export)
    argv = ["--export", str(tmp_path), "--shards", str(tmp_path), "--out", str(tmp_path / "eval.json"),
            "--params", str(params)]
    if error is None:
        with pytest.raises(_Parsed):
            evaluate.main(argv)
    else:
        with pytest.raises(SystemExit) as exit_:
            evaluate.main(argv)
        assert str(exit_.value.code).startswith(error.format(params=params))
        assert "\n" not in str(exit_.value.code)
