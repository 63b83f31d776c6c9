"""Storable text: the NUL and lone-surrogate checks every client string passes through."""

from __future__ import annotations

import json

from registry.validation.text import MAX_PROBLEMS, key_segment, text_problem, text_problems


def test_storable_text_has_no_problem() -> None:
    for text in ("", "tide pools", "\U0001f600 emoji", "語", "\t\n\r", "\x01 other controls"):
        assert text_problem(text) is None
    # A surrogate pair in JSON is one character, not two lone surrogates.
    assert text_problem(json.loads('"\\ud83d\\ude00"')) is None


def test_nul_and_lone_surrogates_are_named_with_their_index() -> None:
    assert text_problem("ab\x00") == "contains a NUL character (at index 2)"
    problem = text_problem(json.loads('"a\\ud800"'))
    assert problem is not None
    assert "lone UTF-16 surrogate (\\ud800 at index 1)" in problem
    assert text_problem(json.loads('"\\udfff"')) is not None


def test_paths_name_every_bad_string_and_key_in_document_order() -> None:
    doc = json.loads(
        '{"texts": ["ok", "a\\u0000"], "sets": {"x\\ud800": ["t"]}, "plain key": ["\\udc00"]}'
    )
    found = [(p.path, p.too_deep) for p in text_problems(doc)]
    assert found == [
        ("$.texts[1]", False),
        ("$.sets['x\\ud800']", False),
        ("$['plain key'][0]", False),
    ]
    # The paths are ASCII: they can be echoed in an error body whatever the key held.
    assert all(p.path.isascii() for p in text_problems(doc))


def test_depth_is_bounded_without_recursion() -> None:
    deep: list[object] = []
    for _ in range(100_000):  # far past the interpreter's recursion limit
        deep = [deep]
    (problem,) = text_problems(deep, max_depth=64)
    assert problem.too_deep
    assert problem.path == "$" + "[0]" * 64
    assert text_problems(deep) == []  # no bound asked: only strings are judged


def test_problem_lists_are_capped() -> None:
    assert len(text_problems(["\x00"] * 1000)) == MAX_PROBLEMS


def test_key_segments() -> None:
    assert key_segment("name") == ".name"
    assert key_segment("x-ext_1") == ".x-ext_1"
    assert key_segment("a.b") == "['a.b']"
    assert key_segment("k" * 100).endswith("...']")
    assert key_segment(3) == "['3']"
