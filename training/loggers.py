"""Loggers whose history survives a resume. Lightning's CSVLogger deletes `metrics.csv` as soon as
a run starts in the same folder (even one that then fails on its checkpoint), and WandbLogger
opens a new W&B run each time; a run resumed with `--ckpt_path` here keeps its CSV rows and
continues its W&B run."""

from __future__ import annotations

import csv
import io
import uuid
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from anystory.atomic import write_atomic


def _step(row: dict[str, Any]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


class AppendingWriter(ExperimentWriter):
    """Keeps the rows already in `metrics.csv`. At its first save, a run drops the file's rows
    from its own first step on (a killed run logged them after its last checkpoint, and this run
    logs them again), so a resumed run continues the curve and a fresh run replaces it; nothing
    is removed before this run has rows to write. Rewrites (that, or a new column) are atomic."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._merged = False

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning deletes metrics.csv here; the rows are merged at the first save instead

    def _read(self) -> tuple[list[str], list[dict[str, Any]]]:
        with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            return list(reader.fieldnames or []), rows

    def _write_all(self, rows: list[dict[str, Any]]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(rows)
        # Temporary file beside it, then a rename: a reader or a kill never meets a half-written file.
        tmp = f"{self.metrics_file_path}.{uuid.uuid4().hex}.tmp"
        with self._fs.open(tmp, "w", newline="") as handle:
            handle.write(text.getvalue())
        self._fs.mv(tmp, self.metrics_file_path)

    def save(self) -> None:
        if not self.metrics:
            return
        rows, self.metrics = self.metrics, []
        new_keys = self._record_new_keys_of(rows)
        if not self._fs.isfile(self.metrics_file_path):
            self._merged = True
            self._write_all(rows)
        elif not self._merged:
            self._merged = True
            header, old = self._read()
            first = min(_step(row) for row in rows)
            self._record_new_keys_of([dict.fromkeys(header)])
            self._write_all([row for row in old if _step(row) < first] + rows)
        elif new_keys:
            self._write_all(self._read()[1] + rows)
        else:
            with self._fs.open(self.metrics_file_path, "a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self.metrics_keys).writerows(rows)

    def _record_new_keys_of(self, rows: list[dict[str, Any]]) -> set[str]:
        new = set().union(*rows) - set(self.metrics_keys)
        self.metrics_keys = sorted(set(self.metrics_keys) | new)
        return new


class AppendingCSVLogger(CSVLogger):
    """CSVLogger writing through AppendingWriter, and by default saving at every logging step, so
    that a killed run keeps the rows up to its kill (Lightning's default saves every 100 steps)."""

    def __init__(self, save_dir: str, name: str | None = "lightning_logs", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 1) -> None:
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class ResumableWandbLogger(WandbLogger):
    """WandbLogger whose run id is kept in the run folder (`<save_dir>/wandb/run_id`, beside W&B's
    own files). The CLI calls `continue_run()` when it resumes from a checkpoint: the W&B run then
    goes on under the stored id (`resume="allow"`); any other start makes a new id and stores it.
    Only rank zero, which alone creates the W&B run, reads or writes the file."""

    RUN_ID_FILE = "wandb/run_id"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._continue = False

    @property
    def run_id_file(self) -> Path:
        return Path(self.save_dir or ".") / self.RUN_ID_FILE

    def continue_run(self) -> None:
        self._continue = True

    def _choose_run_id(self) -> None:
        stored = self.run_id_file.read_text().strip() if self.run_id_file.is_file() else ""
        given = self._wandb_init.get("id")  # an id in the config wins
        run_id = given or (stored if self._continue and stored else uuid.uuid4().hex[:8])  # W&B's id form
        self._wandb_init.update(id=run_id, resume="allow")
        self._id = run_id
        if run_id != stored:
            self.run_id_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_id_file, run_id + "\n")

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None and rank_zero_only.rank == 0:
            self._choose_run_id()
        return super().experiment
