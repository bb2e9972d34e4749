"""Work items and the manifest of a batch generation (no Ray needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from invardiff.scale import Manifest, WorkItem, work_items


def test_item_ids_come_from_the_input_and_duplicates_are_dropped():
    items = work_items(["a cat", 3, "a cat"], seeds=[0, 1])
    assert [item.key for item in items] == [
        "prompt-51e467415607-seed0",  # sha256("a cat")[:12]
        "prompt-51e467415607-seed1",
        "class3-seed0",
        "class3-seed1",
    ]
    assert WorkItem("a cat", 0).id == items[0].id  # whatever the position in the list


def test_work_items_need_inputs_and_seeds():
    with pytest.raises(ValueError, match="at least one input and one seed"):
        work_items([], seeds=[0])


def test_manifest_records_once_and_a_new_manifest_reads_what_is_done(tmp_path):
    item, other = WorkItem(3, 0), WorkItem(4, 0)
    image = np.full((2, 2, 1), 7, np.uint8)
    manifest = Manifest(tmp_path)
    manifest.record(item, image, {"output_sha256": "x"})
    manifest.record(item, image + 1, {"output_sha256": "y"})  # a late duplicate: ignored
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["output_sha256"] for line in lines] == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["class3-seed0.png", "manifest.jsonl"]
    again = Manifest(tmp_path)
    assert again.pending([item, other]) == [other]
    (tmp_path / "class3-seed0.png").unlink()  # a recorded item whose image is gone is generated again
    assert Manifest(tmp_path).pending([item, other]) == [item, other]
