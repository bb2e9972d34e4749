"""Reading plan files and official books: every bad file is a PlanError naming the file, what is wrong and the fix."""

import json

import pytest

from invardiff import CachePlan, ModelFacts, PlanError, plan_file
from invardiff.official import bundled_books, convert_official_book


FACTS = ModelFacts.for_family("flux", {"transformer_blocks": 2, "single_transformer_blocks": 3})


def _plan_text() -> str:
    return json.dumps(CachePlan.reuse_nothing(FACTS, 4).to_dict())


def _bad_files(tmp_path):
    """(name, path, words the message must contain) for each hand-made bad file."""
    directory = tmp_path / "a_directory"
    directory.mkdir()
    utf16 = tmp_path / "utf16.json"
    utf16.write_text(_plan_text(), encoding="utf-16")
    big_int = tmp_path / "bigint.json"
    big_int.write_text('{"format": "invardiff-cache-plan", "format_version": ' + "9" * 5000 + "}")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    whitespace = tmp_path / "whitespace.json"
    with open(whitespace, "wb") as file:  # sparse would not do: the reader must not depend on the file's content
        file.write(b" " * (plan_file.MAX_BYTES + 1))
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"format": "caf\xe9"}')
    nan = tmp_path / "nan.json"
    nan.write_text(_plan_text().replace('"scheduler": null', '"scheduler": NaN'))
    duplicate = tmp_path / "duplicate.json"
    duplicate.write_text('{"format": "a", "format": "b"}')
    return [
        ("directory", directory, ["is a directory", "path of the file"]),
        ("missing", tmp_path / "missing.json", ["does not exist", "Check the path"]),
        ("utf16", utf16, ["UTF-16", "Save the file as UTF-8"]),
        ("bigint", big_int, ["integer of 5000 digits", "at most 100"]),
        ("deep", deep, ["nests arrays or objects 100000 deep", "32"]),
        ("whitespace", whitespace, ["larger than 16 MiB", "not a plan file"]),
        ("latin1", latin1, ["not UTF-8", "0xe9 at offset 15"]),
        ("nan", nan, ["NaN", "not JSON"]),
        ("duplicate", duplicate, ["'format' appears twice"]),
    ]


def test_every_bad_file_is_a_plan_error_naming_file_problem_and_fix(tmp_path):
    for name, path, words in _bad_files(tmp_path):
        with pytest.raises(PlanError) as caught:
            CachePlan.load(path)
        message = str(caught.value)
        assert str(path) in message, name
        for word in words:
            assert word in message, (name, message)
        with pytest.raises(PlanError) as caught:
            convert_official_book(path, "flux")
        assert str(path) in str(caught.value), name


def test_unreadable_file_is_a_plan_error(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    path.write_text(_plan_text())

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", denied)  # root ignores chmod, so deny at open
    with pytest.raises(PlanError, match="permission denied"):
        CachePlan.load(path)


def test_a_bom_is_tolerated_and_a_plan_round_trips(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + _plan_text().encode())
    assert CachePlan.load(path) == CachePlan.reuse_nothing(FACTS, 4)


def test_module_kinds_of_mixed_types_are_a_plan_error_not_a_type_error():
    # The fuzz finding: sorting ["attn", ["x"]] raised TypeError ('<' not supported between list and str).
    data = CachePlan.reuse_nothing(FACTS, 4).to_dict()
    data["model"]["block_lists"][0]["module_kinds"] = ["attn", ["x"], "ff", "context_ff"]
    with pytest.raises(PlanError, match=r"module_kinds must be a list of names"):
        CachePlan.from_dict(data)
    data["model"]["block_lists"][0]["module_kinds"] = [{"a": 1}, 3]
    with pytest.raises(PlanError, match=r"module_kinds must be a list of names"):
        CachePlan.from_dict(data)


def test_format_version_true_is_not_version_1():
    data = CachePlan.reuse_nothing(FACTS, 4).to_dict()
    data["format_version"] = True  # True == 1 in Python
    with pytest.raises(PlanError, match="format_version"):
        CachePlan.from_dict(data)


def test_save_refuses_what_load_would_refuse(tmp_path):
    plan = CachePlan.reuse_nothing(FACTS, 4, provenance={"score": float("nan")})
    with pytest.raises(PlanError, match="NaN"):
        plan.save(tmp_path / "plan.json")
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda b: b.update(transformer_cache_book=[[True]]), "transformer_cache_book' must be a non-empty object"),
        (lambda b: b["transformer_cache_book"].update(attn=[[True, False], [True]]), "has 1 entries; row 0 has 2"),
        (lambda b: b["transformer_cache_book"].update(attn=[[1, 0]]), "must be a non-empty list of booleans"),
        (lambda b: b.update(step_cache_book=[]), "step_cache_book' must be a non-empty 1-D list"),
        (lambda b: b["single_transformer_cache_book"].clear(), "must be a non-empty object"),
        (lambda b: b["transformer_cache_book"].update(attn="1010"), "non-empty 2-D list of booleans"),
    ],
)
def test_malformed_official_books_are_plan_errors(tmp_path, mutate, words):
    book = json.loads(bundled_books()["flux/fast"].read_text())
    mutate(book)
    path = tmp_path / "book.json"
    path.write_text(json.dumps(book))
    with pytest.raises(PlanError) as caught:
        convert_official_book(path, "flux")
    assert words in str(caught.value) and str(path) in str(caught.value)


def test_book_name_with_two_dots_is_not_a_value_error():
    from invardiff.official import parse_book_name

    assert parse_book_name("cache_books_stp28_n0.1.2_th0.7.json") == {"num_inference_steps": 28, "step_quantile": 0.7}
