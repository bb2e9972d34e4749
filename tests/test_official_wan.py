"""The official Wan book layout (SPEC.md A.6): step_cache_bool (or its alias step_cache_book) and module_cache_book
with self_attn / cross_attn / ffn: import, round trip, and malformed books rejected with the problem named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from invardiff import CachePlan, ModelFacts
from invardiff.cli.main import main
from invardiff.official import convert_official_book, official_book
from invardiff.plan import PlanError


# T = 6 steps, L = 3 blocks, as the official sampler writes it (rows of step-cached steps all True, the row after a
# step-cached run all False).
STEP = [False, False, True, False, False, False]
SELF_ATTN = [[False] * 3, [False] * 3, [True] * 3, [False] * 3, [True, False, True], [False, True, True]]
CROSS_ATTN = [[False] * 3, [False] * 3, [True] * 3, [False] * 3, [False, False, True], [False] * 3]
FFN = [[False] * 3, [False] * 3, [True] * 3, [False] * 3, [True] * 3, [True, True, False]]


def _book(**changes):
    modules = {"self_attn": SELF_ATTN, "cross_attn": CROSS_ATTN, "ffn": FFN}
    book = {"step_cache_bool": STEP, "module_cache_book": modules}
    book.update(changes)
    return {key: value for key, value in book.items() if value is not None}


def _write(tmp_path, book, name="invardiff_t2v-1.3B_stp6_n0.1_sth0.5_sa0.5_ca0.5_ff0.5.json"):
    path = tmp_path / name
    path.write_text(json.dumps(book))
    return path


def test_official_wan_book_imports_with_every_bit_in_place(tmp_path):
    plan = convert_official_book(_write(tmp_path, _book()), "wan")
    assert plan.model.family == "wan" and plan.model.model_class == "WanTransformer3DModel"
    assert plan.num_inference_steps == 6 and plan.scheduler == "FlowUniPCMultistepScheduler"
    assert plan.step_cache.tolist() == STEP
    reuse = plan.module_reuse["blocks"]
    assert reuse["self_attn"].tolist() == SELF_ATTN
    assert reuse["cross_attn"].tolist() == CROSS_ATTN
    assert reuse["ffn"].tolist() == FFN
    assert plan.provenance["policy"] == "invardiff-official-book"


def test_step_cache_book_alias_is_accepted_and_must_agree(tmp_path):
    alias = convert_official_book(_write(tmp_path, _book(step_cache_bool=None, step_cache_book=STEP)), "wan")
    assert alias.step_cache.tolist() == STEP
    both = convert_official_book(_write(tmp_path, _book(step_cache_book=STEP)), "wan")
    assert both.step_cache.tolist() == STEP
    differing = _book(step_cache_book=[False] * 6)
    with pytest.raises(PlanError, match="both 'step_cache_bool' or 'step_cache_book' and they differ"):
        convert_official_book(_write(tmp_path, differing), "wan")


def test_round_trip_official_to_plan_to_official(tmp_path):
    book = _book()
    plan = convert_official_book(_write(tmp_path, book), "wan")
    assert official_book(plan) == book
    saved = tmp_path / "plan.json"
    plan.save(saved)
    reloaded = CachePlan.load(saved)
    again = convert_official_book(_write(tmp_path, official_book(reloaded), "again.json"), "wan")
    assert np.array_equal(again.step_cache, plan.step_cache)
    for kind, matrix in plan.module_reuse["blocks"].items():
        assert np.array_equal(again.module_reuse["blocks"][kind], matrix)


def test_official_book_of_a_family_without_a_writer_is_refused(tmp_path):
    facts = ModelFacts.for_family("hunyuanvideo", {"transformer_blocks": 2, "single_transformer_blocks": 4})
    with pytest.raises(PlanError, match=r"writes official books of \['dit', 'flux', 'wan'\] only, not of 'hunyuan"):
        official_book(CachePlan.reuse_nothing(facts, 4))


@pytest.mark.parametrize("book", ["flux/fast", "dit/slow"])
def test_shipped_flux_and_dit_books_round_trip_through_the_writer(book, tmp_path):
    from invardiff.official import bundled_books

    path = bundled_books()[book]
    plan = convert_official_book(path, book.split("/")[0])
    written = official_book(plan)
    original = json.loads(path.read_text())
    for key, value in written.items():  # every table the writer writes, as shipped (FLUX books also hold ip_attn)
        assert value == ({kind: original[key][kind] for kind in value} if isinstance(value, dict) else original[key])
    again = convert_official_book(_write(tmp_path, written, "again.json"), plan.model.family)
    assert again.to_dict()["step_cache"] == plan.to_dict()["step_cache"]
    assert again.to_dict()["module_reuse"] == plan.to_dict()["module_reuse"]


@pytest.mark.parametrize(
    ("book", "problem"),
    [
        (_book(step_cache_bool=None), "no 'step_cache_bool' or 'step_cache_book'"),
        (_book(module_cache_book=None), "needs 'module_cache_book'"),
        (_book(module_cache_book={"self_attn": SELF_ATTN, "cross_attn": CROSS_ATTN}), r"exactly the kinds .*'ffn'"),
        (
            _book(module_cache_book={"self_attn": SELF_ATTN, "cross_attn": CROSS_ATTN, "ffn": FFN, "mlp": FFN}),
            r"exactly the kinds .*got \['cross_attn', 'ffn', 'mlp', 'self_attn'\]",
        ),
        (_book(module_cache_book=[SELF_ATTN]), "'module_cache_book' must be a non-empty object"),
        (
            _book(module_cache_book={"self_attn": SELF_ATTN, "cross_attn": CROSS_ATTN, "ffn": [[0, 1, 0]] * 6}),
            r"'module_cache_book.ffn\[0\]' must be a non-empty list of booleans",
        ),
        (
            _book(module_cache_book={"self_attn": SELF_ATTN, "cross_attn": CROSS_ATTN, "ffn": FFN[:-1] + [[True]]}),
            r"'module_cache_book.ffn\[5\]' has 1 entries; row 0 has 3",
        ),
        (
            _book(module_cache_book={"self_attn": SELF_ATTN, "cross_attn": CROSS_ATTN, "ffn": [r[:2] for r in FFN]}),
            "must all be T x L of one shape",
        ),
        (_book(step_cache_bool=STEP + [False]), r"must have shape \(7, 3\)"),
        (_book(step_cache_bool="001000"), "'step_cache_bool' must be a non-empty 1-D list of booleans"),
    ],
)
def test_malformed_wan_books_are_rejected_naming_the_problem(tmp_path, book, problem):
    with pytest.raises(PlanError, match=problem):
        convert_official_book(_write(tmp_path, book), "wan")


def test_cli_converts_a_wan_book(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["convert-official", str(_write(tmp_path, _book())), "--family", "wan", "-o", str(out)]) == 0
    capsys.readouterr()
    assert CachePlan.load(out).step_cache.tolist() == STEP
