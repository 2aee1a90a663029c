from __future__ import annotations

from pathlib import Path

import open_clip

from anystory.tokenizer import build_clip_tokenizer


def test_offline_tokenizer_matches_openai_clip_ids(tokenizer_dir):
    tokenizer = build_clip_tokenizer(tokenizer_dir)
    for text in ("a photo of a cat", "Two wooden TOYS, on a red rug!", "naïve café"):
        ours = tokenizer(text)["input_ids"]
        reference = open_clip.tokenize([text])[0].tolist()
        assert ours == reference[: len(ours)] and all(t == 0 for t in reference[len(ours):])
    padded = build_clip_tokenizer(tokenizer_dir, pad_token="!")(["x"], padding="max_length")["input_ids"][0]
    assert len(padded) == 77 and padded[-1] == 0  # "!" is id 0, SDXL's second tokenizer's pad


def _build_in_rounds(folders: list[str], barrier, results) -> None:
    """One 'rank': for each round, wait until every process is ready, then build the tokenizer on
    that round's (shared, initially empty) folder and tokenize a fixed caption."""
    from anystory.tokenizer import build_clip_tokenizer

    for round_index, folder in enumerate(folders):
        barrier.wait()
        try:
            ids = build_clip_tokenizer(folder)("two wooden toys on a red rug")["input_ids"]
            results.put((round_index, ids))
        except Exception as err:  # reported to the test, which names it
            results.put((round_index, f"{type(err).__name__}: {err}"))


def test_processes_starting_together_on_one_empty_folder_all_read_whole_files(tmp_path):
    """Ranks of a multi-process run build the tokenizer on one cache folder at the same moment (the
    barrier releases them together); each of several rounds starts from an empty folder. Every
    process must get the same ids as OpenAI CLIP's tokenizer, and no temporary file may stay."""
    import multiprocessing

    processes, rounds = 4, 4
    folders = [str(tmp_path / f"round{r}") for r in range(rounds)]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as torchrun starts them
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_build_in_rounds, args=(folders, barrier, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    got = [results.get(timeout=300) for _ in range(processes * rounds)]
    for worker in workers:
        worker.join(timeout=60)
    expected = [t for t in open_clip.tokenize(["two wooden toys on a red rug"])[0].tolist() if t]
    failures = [(r, ids) for r, ids in got if ids != expected]
    assert not failures, failures[:3]
    assert all(worker.exitcode == 0 for worker in workers)
    for folder in folders:
        assert sorted(p.name for p in Path(folder).iterdir()) == ["merges.txt", "vocab.json"]
