"""Work items and the output manifest of a batch generation: one file per (input, seed), written once.

An item's id is derived from its input (a class id, or a hash of the prompt), so the same input keeps its file
name whatever its position in the list, and a repeated input is generated once. The manifest is an append-only JSON
lines file beside the outputs; an item is done when its line is there and its file exists. The file (a PNG image,
or a GIF for a video model's clip) is written under a temporary name and renamed into place before its manifest
line is appended, so an interrupted run leaves either nothing or a complete file for an item, and a rerun skips
exactly the recorded items.

Every line also records the run's *settings*: everything besides the input and the seed that changes an output
(the model and its weights, the sampling arguments, the policy with its plan digest and every setting; see
:func:`invardiff.scale.runner.output_settings`). A directory holds the outputs of one set of settings: opening its
manifest with other settings raises :class:`SettingsMismatch` naming the fields that differ, instead of resuming a
run whose finished items were made another way (``overwrite=True`` starts the manifest afresh).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import append_json_line, atomic_path, read_json_lines, write_text


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


class SettingsMismatch(ValueError):
    """An output directory holds items made with other settings than the run's; ``differences`` lists
    ``(field, there, now)`` for each differing field (dotted names, e.g. ``call.num_inference_steps``)."""

    def __init__(self, directory: Path, count: int, differences: list[tuple[str, object, object]]):
        self.directory, self.count, self.differences = directory, count, differences
        super().__init__(
            f"{directory} holds {count} output(s) made with other settings ({describe(differences)}); pass "
            "overwrite=True to replace them, or write to another directory."
        )


def describe(differences: list[tuple[str, object, object]], limit: int = 6) -> str:
    """``field: X there, Y now; ...`` for the first ``limit`` differences (digests shortened to 12 characters, a
    config shown by its type)."""
    parts = [f"{field}: {_show(there)} there, {_show(now)} now" for field, there, now in differences[:limit]]
    more = len(differences) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


UNSET = object()  # a field that one of two settings lacks


def _show(value) -> str:
    if value is UNSET:
        return "unset"
    if isinstance(value, dict):
        return f"{value['type']}(...)" if "type" in value else "{...}"
    is_digest = isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    return repr(value[:12] if is_digest else value)


def differences(there, now, field: str = "") -> list[tuple[str, object, object]]:
    """The fields of two settings that differ, as ``(dotted field, there, now)``; a field one side lacks is
    :data:`UNSET`, and a whole config on one side only is one difference (``policy: None there, PlanConfig now``)."""
    if field == "" and there is None:
        return [("settings", "not recorded (an older invardiff)", "recorded")]
    if isinstance(there, dict) and isinstance(now, dict):
        found = []
        for key in sorted(set(there) | set(now), key=lambda key: (key != "type", key)):  # a config's type first
            found += differences(there.get(key, UNSET), now.get(key, UNSET), f"{field}.{key}" if field else key)
        return found
    return [] if there == now else [(field, there, now)]


class Manifest:
    """The records of the finished items in ``directory`` (one JSON line each) and the writer of new ones.

    Args:
        directory: the output directory (created with the first output).
        settings: what besides input and seed determines an output (:func:`~invardiff.scale.runner.output_settings`);
            recorded with every item.
        overwrite: forget the items recorded with any settings and start the manifest afresh (their files are
            replaced as the items are generated again); without it, records of other settings raise
            :class:`SettingsMismatch`.
    """

    def __init__(self, directory: str | Path, settings: dict, overwrite: bool = False):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"{self.directory} is a file; the outputs need a directory.")
        self.path = self.directory / MANIFEST
        self.settings, self.digest = settings, settings_digest(settings)
        self.records: dict[str, dict] = {}
        if overwrite:
            if self.path.exists():
                write_text(self.path, "")
            return
        if self.path.exists():
            for record in read_json_lines(self.path):
                self.records[record["key"]] = record
        others = [record for record in self.records.values() if record.get("settings_sha256") != self.digest]
        if others:
            raise SettingsMismatch(self.directory, len(others), differences(others[0].get("settings"), settings))

    def done(self, item: WorkItem) -> bool:
        record = self.records.get(item.key)
        return record is not None and (self.directory / record["file"]).exists()

    def pending(self, items: list[WorkItem]) -> list[WorkItem]:
        return [item for item in items if not self.done(item)]

    def record(self, item: WorkItem, output: np.ndarray, info: dict) -> Path:
        """Write ``output`` (an image, uint8 ``(H, W, C)``, as ``<key>.png``; a clip, uint8 ``(F, H, W, C)``, as
        the animated ``<key>.gif`` that ``invardiff generate`` writes) and append its manifest line; an item
        already recorded is not written again (a retried item whose first result arrived after all)."""
        if self.done(item):
            return self.directory / self.records[item.key]["file"]
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{item.key}{'.gif' if output.ndim == 4 else '.png'}"
        if output.ndim == 4:
            from ..video_files import save_gif

            save_gif(torch.tensor(output).permute(0, 3, 1, 2).float() / 255, path)  # (F, C, H, W) in [0, 1]
        else:
            from PIL import Image

            with atomic_path(path) as temporary:
                Image.fromarray(output.squeeze(-1) if output.shape[-1] == 1 else output).save(temporary, format="png")
        record = {"key": item.key, "id": item.id, "input": item.input, "seed": item.seed, "file": path.name}
        record.update({**info, "settings_sha256": self.digest, "settings": self.settings})
        append_json_line(self.path, record)
        self.records[item.key] = record
        return path
