"""Stage 2, `annotate_auto`: the GroundingDINO + SAM annotator (pipelines/auto_annotator.py) over live rows.

Only live rows go to the model, in batches of `batch_size` images; its `subjects` come back in the
same layout as AnnotateGiven's (masks stay HxW bool arrays: rows cross Ray boundaries pickled, not
as Arrow columns). A row the annotator reports in `annotate_error` is rejected with that error's
reason; its detail goes to `reject_detail`, for the status table. The model is built once per
instance (once per Ray actor), from a config that params validation has already checked.
"""

from __future__ import annotations

from pipelines.batch import Batch, ensure_column, live_rows, reject
from pipelines.config import AutoAnnotateConfig


class AnnotateAuto:
    def __init__(self, model: AutoAnnotateConfig, batch_size: int):
        # imported here: the models' packages load only where the stage runs (a Ray actor)
        from pipelines.auto_annotator import AutoAnnotator

        self.annotator = AutoAnnotator(model)
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
