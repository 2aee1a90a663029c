"""Stage 2, `annotate_auto`: the GroundingDINO + SAM annotator (pipelines/annotate_auto.py) over live rows.

Only live rows go to the model, in batches of `batch_size` images; its `subjects` come back in the
same layout as AnnotateGiven's (masks stay HxW bool arrays: rows cross Ray boundaries pickled, not
as Arrow columns). A row the annotator reports in `annotate_error` is rejected with that error's
reason; its detail goes to `reject_detail`, for the status table. The model is built once per
instance (once per Ray actor).
"""

from __future__ import annotations

from typing import Any

from anystory.typed_config import ConfigError
from pipelines.batch import Batch, ensure_column, live_rows, reject


def build_auto_config(model: dict[str, Any]):
    """The other module's AutoAnnotateConfig from params, validated: a clear error before any work."""
    try:
        from pipelines.annotate_auto import AutoAnnotateConfig
    except ImportError as err:
        raise ConfigError("data.annotate.mode: 'auto' needs pipelines/annotate_auto.py and its models' packages"
                          f" ({err})") from err
    try:
        cfg = AutoAnnotateConfig.from_dict(model)
        cfg.validate()
    except (TypeError, ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data.annotate.auto.model: {err}") from err
    return cfg


class AnnotateAuto:
    def __init__(self, model: dict[str, Any], batch_size: int):
        from pipelines.annotate_auto import AutoAnnotator

        self.annotator = AutoAnnotator(build_auto_config(model))
        self.batch_size = batch_size

    def __call__(self, batch: Batch) -> Batch:
        ensure_column(batch, "subjects")
        rows = list(live_rows(batch))
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            inp = {"image": [batch["image"][i] for i in chunk], "caption": [batch["caption"][i] for i in chunk]}
            if "labels" in batch:
                inp["labels"] = [batch["labels"][i] for i in chunk]
            out = self.annotator(inp)
            errors = out.get("annotate_error") or [None] * len(chunk)
            for i, subjects, error in zip(chunk, out["subjects"], errors, strict=True):
                if error is not None:
                    reject(batch, i, error.reason)
                    ensure_column(batch, "reject_detail")[i] = error.detail or None
                    continue
                batch["subjects"][i] = [dict(s, score=float(s["score"]), bbox=[float(v) for v in s["bbox"]])
                                        for s in subjects]
        return batch
