"""Work items and the output manifest of a batch generation: one image file per (input, seed), written once.

An item's id is derived from its input (a class id, or a hash of the prompt), so the same input keeps its file
name whatever its position in the list, and a repeated input is generated once. The manifest is an append-only JSON
lines file beside the images; an item is done when its line is there and its image file exists. The image is
written to a temporary name and renamed into place before its manifest line is appended, so an interrupted run
leaves either nothing or a complete image for an item, and a rerun skips exactly the recorded items.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class WorkItem:
    """One image to generate: ``input`` (a prompt or a class id) with ``seed``."""

    input: str | int
    seed: int

    @property
    def id(self) -> str:
        if isinstance(self.input, int):
            return f"class{self.input}"
        return "prompt-" + hashlib.sha256(self.input.encode()).hexdigest()[:12]

    @property
    def key(self) -> str:
        """The item's file stem and manifest key: id and seed."""
        return f"{self.id}-seed{self.seed}"


def work_items(inputs: list, seeds: list[int]) -> list[WorkItem]:
    """Every input with every seed, in input-major order; duplicates are dropped (they would share a file)."""
    if not inputs or not seeds:
        raise ValueError(f"A batch generation needs at least one input and one seed, got {inputs!r} and {seeds!r}.")
    items = {}
    for item in inputs:
        for seed in seeds:
            work = WorkItem(item, int(seed))
            items.setdefault(work.key, work)
    return list(items.values())


class Manifest:
    """The records of the finished items in ``directory`` (one JSON line each) and the writer of new ones."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / MANIFEST
        self.records: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.records[record["key"]] = record

    def done(self, item: WorkItem) -> bool:
        record = self.records.get(item.key)
        return record is not None and (self.directory / record["file"]).exists()

    def pending(self, items: list[WorkItem]) -> list[WorkItem]:
        return [item for item in items if not self.done(item)]

    def record(self, item: WorkItem, image: np.ndarray, info: dict) -> Path:
        """Write ``image`` (uint8 ``(H, W, C)``) as ``<key>.png`` and append its manifest line; an item already
        recorded is not written again (a retried item whose first result arrived after all)."""
        from PIL import Image

        if self.done(item):
            return self.directory / self.records[item.key]["file"]
        path = self.directory / f"{item.key}.png"
        temporary = path.with_name(f".{path.name}.tmp")
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(temporary, format="png")
        os.replace(temporary, path)
        record = {"key": item.key, "id": item.id, "input": item.input, "seed": item.seed, "file": path.name, **info}
        with self.path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        self.records[item.key] = record
        return path
