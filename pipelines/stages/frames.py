"""Views between video rows and per-frame image rows, so image stages (annotate, filter) run on frames."""

from __future__ import annotations

from pipelines.batch import Batch, live_rows

PER_FRAME = ("subjects",)  # per-frame results of earlier image stages, handed on to the next one


def _col(videos: Batch, name: str) -> list:
    return videos.get(name) or [None] * len(videos["frames"])


def frames_to_images(videos: Batch) -> tuple[Batch, list[tuple[int, int]]]:
    """One image row per sampled frame of every live video, and (video row, frame slot) of each.

    A frame an earlier image stage rejected stays rejected (its reason is in `frame_rejects`).
    """
    carried = [c for c in PER_FRAME if c in videos]
    rows: Batch = {c: [] for c in ("image", "caption", "labels", "annotations", "reject", "alpha", "geometry",
                                   *carried)}
    where = []
    given, labels, frame_rejects = _col(videos, "frame_annotations"), _col(videos, "labels"), _col(videos, "frame_rejects")
    geometries = _col(videos, "geometry")
    for v in live_rows(videos):
        for k, frame in enumerate(videos["frames"][v]):
            rows["image"].append(frame)
            rows["caption"].append(videos["caption"][v])
            rows["labels"].append(labels[v])
            rows["annotations"].append(None if given[v] is None else given[v].get(videos["frame_indices"][v][k], []))
            rows["reject"].append(frame_rejects[v][k] if frame_rejects[v] else None)
            rows["alpha"].append(None)
            rows["geometry"].append(geometries[v])  # given masks are in the video's coordinates
            for c in carried:
                rows[c].append(videos[c][v][k])
            where.append((v, k))
    return rows, where


def images_to_frames(videos: Batch, images: Batch, where: list[tuple[int, int]], columns: tuple[str, ...]) -> Batch:
    """Write the per-frame results `columns` back as lists aligned with each video's sampled frames."""
    for col in (*columns, "frame_rejects"):
        old = videos.get(col)
        videos[col] = [None] * len(videos["frames"])
        for v in live_rows(videos):
            videos[col][v] = list(old[v]) if col == "frame_rejects" and old and old[v] else [None] * len(
                videos["frames"][v])
    for i, (v, k) in enumerate(where):
        for col in columns:
            videos[col][v][k] = images.get(col, [None] * len(where))[i]
        videos["frame_rejects"][v][k] = images["reject"][i]
    return videos
