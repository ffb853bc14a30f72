"""Task suites and scorers: tricky answers, seeded disjoint splits, file formats."""

from __future__ import annotations

import json

import pytest

from edge_adapt.errors import UsageError
from edge_adapt.tasks import (
    LEVELS, ExactMatch, FinalNumber, RegexMatch, arith_problems, arith_suite, extract_final_number, gsm8k_suite,
    StatedNumber, jsonl_suite, load_suite, normalize_number, resolve_scorer,
)
from edge_adapt.tasks.files import GSM8K_DEFAULT


@pytest.mark.parametrize("text, want", [
    ("The answer is 72.", "72"),
    ("They sold 1,234 apples. The answer is 1,234.", "1234"),
    ("The answer is $1,200.50 in total.", "1200.5"),
    ("It costs 5 dollars each, so 3 cost 15 dollars.", "15"),
    ("The temperature dropped to -7 degrees. The answer is -7.", "-7"),
    ("The answer is −12.", "-12"),
    ("First 3 + 4 = 7. The answer is 7. Then I checked 2 more.", "7"),
    ("The answer is: **42**", "42"),
    ("#### 18", "18"),
    ("So the total is \\boxed{96}.", "96"),
    ("She has 12 apples.", "12"),
    ("The answer is 3.0", "3"),
    ("Final Answer is 8 cookies", "8"),
    ("no numbers here", None),
    ("The answer is 8 + 5 = 13.", "13"),
    ("The answer is 13 books, because 8 + 5 makes it.", "13"),
    ("The answer is: 3 x 4 = 12 apples.\nLater I counted 5.", "12"),
    ("The answer is 2.5 hours.", "2.5"),
    ("The answer is N. So 7.", "7"),
    ("Lists like 3,4 and 5", "5"),
    ("It is " + "1" * 40 + " grams.", "1" * 40),  # longer than Decimal's 28 digits: read, not a crash
])
def test_final_number_extraction_on_tricky_answers(text, want):
    assert extract_final_number(text) == want


@pytest.mark.parametrize("text, ref, ok", [
    ("The answer is 1,234.", "1234", True),
    ("The answer is 1234 apples.", "#### 1,234", True),
    ("The answer is 72.", "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", True),
    ("The answer is -5.", "5", False),
    ("The answer is 5.00", "5", True),
    ("I think 5. The answer is 6.", "5", False),
    ("", "5", False),
])
def test_final_number_scorer(text, ref, ok):
    assert FinalNumber().correct(text, ref) is ok


def test_exact_regex_and_custom_scorers():
    assert ExactMatch().correct("  Paris. ", "paris")
    assert not ExactMatch().correct("Paris, France", "paris")
    rx = RegexMatch(r"Answer:\s*([A-D])")
    assert rx.correct("I think... Answer: B", "b")  # the pattern is as case-sensitive as written
    assert rx.extract("Answer: A ... Answer: C") == "c"
    assert not rx.correct("no letter", "A")
    custom = resolve_scorer("test_tasks:_contains_ok")
    assert custom.correct("it is OK", "x") and not custom.correct("nope", "x")
    assert resolve_scorer("regex:(\\d+)").correct("got 7", "7")
    with pytest.raises(UsageError):
        resolve_scorer("nonsense")
    with pytest.raises(UsageError):
        resolve_scorer("regex:(")


def _contains_ok(text: str, reference: str) -> bool:
    return "OK" in text


def test_arith_is_seeded_and_splits_are_disjoint():
    for level in LEVELS:
        a = arith_problems(level, "test", 30)
        assert a == arith_problems(level, "test", 30)
        texts = {split: {p.messages[0]["content"] for p in arith_problems(level, split, 30)}
                 for split in ("train", "validation", "test")}
        assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
        assert not texts["validation"] & texts["test"]
        assert len(texts["test"]) == 30
        assert all(p.level == level and p.answer.lstrip("-").isdigit() for p in a)
    assert arith_problems(1, "test", 5, seed=1) != arith_problems(1, "test", 5, seed=0)


def test_arith_answers_are_right():
    import re

    for p in arith_problems(2, "test", 20):
        a, b = map(int, re.findall(r"\d+", p.messages[0]["content"])[:2])
        assert int(p.answer) == a * b
    for p in arith_problems(4, "test", 20):
        assert int(p.answer) == sum(map(int, re.findall(r"\d+", p.messages[0]["content"])))
    suite = arith_suite("test", 23)
    assert len(suite) == 23 and [p.level for p in suite.problems[:5]] == [1, 2, 3, 4, 5]
    assert all(p.messages[-1]["content"].endswith("Answer briefly.") for p in suite.problems)


def test_suite_levels_pick_arith_levels_and_keep_their_problems():
    hard = load_suite("arith", split="train", n=10, levels=[5, 4, 4])
    assert [p.level for p in hard.problems] == [4, 5] * 5
    # The same prompts as in the all-levels suite: a pool cache or label file made from either is reused.
    every = {p.id: p for p in load_suite("arith", split="train", n=50).problems}
    assert all(every[p.id] == p for p in hard.problems)
    with pytest.raises(UsageError, match="not 7"):
        load_suite("arith", levels=[4, 7])
    with pytest.raises(UsageError, match="has no levels"):
        load_suite("gsm8k", n=5, levels=[4])


def _raises(text: str, reference: str) -> bool:
    raise ValueError("boom\nsecond line")


def _one_argument(text: str) -> bool:
    return True


@pytest.mark.parametrize("fn, said", [("_raises", "raised ValueError \\(boom second line\\)"),
                                      ("_one_argument", "takes \\(text\\), not \\(text, reference\\)")])
def test_a_custom_scorer_that_fails_is_one_line_naming_it(fn, said):
    """Was: "unexpected ValueError ... (rerun with --debug)", exit 70, as if edge-adapt had the bug. A signature
    that cannot take (text, reference) is refused when the scorer loads, before any sampling."""
    with pytest.raises(UsageError, match=f"scorer 'test_tasks:{fn}' {said}") as got:
        resolve_scorer(f"test_tasks:{fn}").correct("The answer is 4", "4")
    assert "\n" not in str(got.value)


def test_data_is_refused_where_no_suite_reads_it(tmp_path):
    """Was: --data silently ignored by arith (and every family but gsm8k), and silently read instead of the
    file --suite names."""
    mine, other = tmp_path / "mine.jsonl", tmp_path / "other.jsonl"
    mine.write_text(json.dumps({"prompt": "1+1?", "answer": 2}) + "\n")
    other.write_text(json.dumps({"prompt": "2+2?", "answer": 4}) + "\n")
    with pytest.raises(UsageError, match="--data is read by --suite gsm8k, --suite mix and --family gsm8k"):
        load_suite("arith", n=3, path=mine)
    with pytest.raises(UsageError, match="family 'units' generates its problems"):
        load_suite("arith", family="units", n=3, path=mine)
    with pytest.raises(UsageError, match="two different files"):
        load_suite(str(mine), path=other)
    # Where it is read: the suite's own file named twice, or the file of --suite jsonl.
    assert [p.answer for p in load_suite(str(mine), path=tmp_path / "." / "mine.jsonl").problems] == ["2"]
    assert [p.answer for p in load_suite("jsonl", path=other).problems] == ["4"]


def test_gsm8k_file_reads_final_number(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"question": "How many?", "answer": "2+3=<<2+3=5>>5\n#### 1,005"}) + "\n\n")
    s = gsm8k_suite(f)
    assert s.problems[0].answer == "1005" and s.scorer.correct("The answer is 1,005.", s.problems[0].answer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no marker here"}) + "\n")
    with pytest.raises(UsageError):
        gsm8k_suite(bad)


@pytest.mark.skipif(not GSM8K_DEFAULT.exists(), reason="the shared GSM8K split is not beside this checkout")
def test_shared_gsm8k_training_split_loads():
    s = load_suite("gsm8k", n=50)
    assert len(s) == 50 and s.problems[0].answer == "72"


def test_user_jsonl_suite_with_prompt_or_messages(tmp_path):
    f = tmp_path / "mine.jsonl"
    rows = [{"prompt": "Capital of France?", "answer": "Paris", "level": 2},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
             "answer": "4", "id": "sum"}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    s = jsonl_suite(f, "exact")
    assert [p.id for p in s.problems] == ["mine-0", "sum"] and s.problems[0].level == 2
    assert s.scorer.correct("paris.", "Paris") and len(s.problems[1].messages) == 2
    assert load_suite(str(f), scorer="exact").name == "mine"
    with pytest.raises(UsageError, match="--scorer applies to a .jsonl suite; suite 'units' scores with its own"):
        load_suite("arith", family="units", scorer="exact")  # a built-in suite's scorer is its own, not ignored
    (tmp_path / "broken.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(UsageError):
        jsonl_suite(tmp_path / "broken.jsonl")
    (tmp_path / "levels.jsonl").write_text('{"prompt": "x", "answer": "1", "level": "3"}\n'
                                           '{"prompt": "y", "answer": "2", "level": "hard"}\n')
    with pytest.raises(UsageError, match=r"levels.jsonl:2: level must be a whole number .*, got 'hard'"):
        jsonl_suite(tmp_path / "levels.jsonl")  # was: "unexpected ValueError: invalid literal for int()"
    assert jsonl_suite(tmp_path / "levels.jsonl", n=1).problems[0].level == 3
    # Bytes that are not UTF-8: one line naming where (was "unexpected UnicodeDecodeError", exit 70).
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(UsageError, match=r"latin1.jsonl: not valid UTF-8 text \(line 1, byte 15\)"):
        jsonl_suite(tmp_path / "latin1.jsonl")
    # A line separator (U+2028) inside a JSON string is text, not the end of a line.
    (tmp_path / "ls.jsonl").write_text('{"prompt": "one\u2028two", "answer": "1"}\n', encoding="utf-8")
    assert jsonl_suite(tmp_path / "ls.jsonl").problems[0].messages[0]["content"].startswith("one\u2028two")


def test_measure_names_a_missing_data_file_in_one_line(tmp_path, capsys):
    from edge_adapt.tasks.measure import main

    assert main(["gsm8k", "--prompts", "1", "--data", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the gsm8k family reads") and "none.jsonl" in err and err.count("\n") == 1, err


def test_user_suite_errors_name_the_files_line(tmp_path):
    """Line numbers count the file's lines (blank ones too), a bad chat message names its line, a chat must end
    with the user's message, a null answer is refused (it was scored against the text "None"), and a UTF-8
    byte-order mark is read past."""
    f = tmp_path / "s.jsonl"
    f.write_text('{"prompt": "a", "answer": "1"}\n\n\n{"prompt": "b"}\n')
    with pytest.raises(UsageError, match=r"s.jsonl:4: needs 'answer'"):
        jsonl_suite(f)  # was "line 2": the second non-blank row
    f.write_text('{"prompt": "a", "answer": "1"}\n{"messages": [{"role": "wizard", "content": "hi"}], "answer": "1"}\n')
    with pytest.raises(UsageError, match=r"s.jsonl:2: bad chat message \{'role': 'wizard'"):
        jsonl_suite(f)  # was "bad chat message {...}" from the chat template, once the model had loaded
    f.write_text('{"messages": [{"role": "user", "content": 5}], "answer": "1"}\n')
    with pytest.raises(UsageError, match=r"s.jsonl:1: bad chat message"):
        jsonl_suite(f)
    f.write_text('{"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}], '
                 '"answer": "4"}\n')
    with pytest.raises(UsageError, match=r"s.jsonl:1: the last message must be the user's, got the assistant's"):
        jsonl_suite(f)  # the model would answer a turn after its own, a question nobody asked
    for bad in ("null", "[1]", "true"):
        f.write_text(f'{{"prompt": "a", "answer": {bad}}}\n')
        with pytest.raises(UsageError, match=r"s.jsonl:1: answer must be a string or a finite number"):
            jsonl_suite(f)
    f.write_text('{"prompt": "a", "answer": 12}\n')
    assert jsonl_suite(f).problems[0].answer == "12"
    f.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": "1"}\n')
    assert [p.text for p in jsonl_suite(f).problems] == ["user: a"]  # was "not JSON (Unexpected UTF-8 BOM)"


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_user_suite_refuses_an_answer_that_is_not_a_finite_number(tmp_path, bad):
    """Python's json reads NaN and Infinity (and 1e999 as inf): the reference would be the text "nan" or "inf"."""
    f = tmp_path / "s.jsonl"
    f.write_text(f'{{"prompt": "What is 1+1?", "answer": 2}}\n{{"prompt": "What is 2+2?", "answer": {bad}}}\n')
    with pytest.raises(UsageError, match=r"s.jsonl:2: answer must be a string or a finite number, got (nan|inf|-inf)$"):
        jsonl_suite(f)


def test_user_suite_refuses_a_problem_twice(tmp_path):
    """A problem twice would count twice in every accuracy and share its sample seeds."""
    f = tmp_path / "s.jsonl"
    line = '{"prompt": "What is 2 + 2?", "answer": "4"}'
    f.write_text(f"{line}\n{line}\n")
    with pytest.raises(UsageError, match=r"s.jsonl:2: duplicate prompt \(first on line 1\)"):
        jsonl_suite(f)
    f.write_text('{"id": "q", "prompt": "a", "answer": "1"}\n{"id": "q", "prompt": "b", "answer": "2"}\n')
    with pytest.raises(UsageError, match=r"s.jsonl:2: duplicate id 'q' \(first on line 1\)"):
        jsonl_suite(f)
    f.write_text('{"id": "q", "prompt": "a", "answer": "1"}\n{"id": "r", "prompt": "b", "answer": "1"}\n')
    assert [p.id for p in jsonl_suite(f).problems] == ["q", "r"]


def test_a_number_of_any_length_is_read_not_a_crash():
    """int() refuses more than 4,300 digits: a suite's huge answer crashed scoring after generation."""
    big = "7" * 5000
    assert normalize_number(big) == big and normalize_number("-" + big + ".500") == "-" + big + ".5"
    assert FinalNumber().correct(f"The answer is {big}.", big)
    assert not FinalNumber().correct(f"The answer is {big}1.", big)
    assert StatedNumber().correct(f"so it is {big}", big)
    assert [normalize_number(x) for x in ("3.0", "-0.0", "1,234.50", "$12", "0.10")] == ["3", "0", "1234.5", "12", "0.1"]


def test_a_suite_line_nested_too_deeply_is_one_error_naming_its_line(tmp_path):
    """Was `error: unexpected RecursionError` (exit 70), for --suite FILE.jsonl and --suite gsm8k --data FILE."""
    f = tmp_path / "deep.jsonl"
    f.write_text('{"prompt": "a", "answer": "1"}\n' + "[" * 100_000 + "\n")
    for read in (jsonl_suite, gsm8k_suite):
        with pytest.raises(UsageError, match=f"^{f}:2: JSON nested too deeply$"):
            read(f)


@pytest.mark.parametrize("flags", [["--prompts", "0"], ["--prompts", "-1"], ["--max-tokens", "0"]])
def test_measure_refuses_a_count_below_one_before_the_table(flags, capsys):
    """--prompts 0 divided by zero after the header, -1 printed nonsense rows, --max-tokens 0 ran with each
    family's default: each is one error line and exit 2, before any model loads."""
    from edge_adapt.tasks.measure import main

    assert main(["arith", "--threads", "1", *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: {flags[0]} must be a whole number >= 1, got {flags[1]}\n", (out, err)
