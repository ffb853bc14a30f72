"""Task families: seeded and hash-disjoint splits, right answers, exact checkers, the mix, and the CLI's choices."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edge_adapt.errors import UsageError
from edge_adapt.tasks import (
    FAMILIES, GSM8K_DEFAULT, FinalNumber, Gsm8kFamily, StatedNumber, Weekday, extract_weekday, family_suite,
    get_family, load_suite, mix_suite, resolve_scorer,
)
from edge_adapt.tasks.gsm8k import steps_of
from edge_adapt.tasks.scorers import WEEKDAYS
from edge_adapt.tasks.units import _MEASURE, _TIME

GENERATED = [name for name, f in FAMILIES.items() if not isinstance(f, Gsm8kFamily)]
have_gsm8k = pytest.mark.skipif(not GSM8K_DEFAULT.exists(), reason="the shared GSM8K split is not beside this checkout")


def _question(p) -> str:
    return p.messages[-1]["content"]


def test_there_are_at_least_six_families_beside_arith_and_gsm8k():
    assert len(set(FAMILIES) - {"arith", "gsm8k"}) >= 6
    assert "gsm8k" in FAMILIES and "steps" in FAMILIES


@pytest.mark.parametrize("name", GENERATED)
def test_family_is_seeded_and_its_splits_are_disjoint(name):
    fam = FAMILIES[name]
    for level in fam.levels:
        by_split = {split: fam.problems(level, split, 25) for split in ("train", "validation", "test")}
        assert by_split["test"] == fam.problems(level, "test", 25)  # deterministic per seed
        assert fam.problems(level, "test", 10) == by_split["test"][:10]  # a prefix does not depend on n
        texts = {s: {_question(p) for p in ps} for s, ps in by_split.items()}
        ids = {s: {p.id for p in ps} for s, ps in by_split.items()}
        for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
            assert not texts[a] & texts[b] and not ids[a] & ids[b], (name, level, a, b)
        assert all(len(t) == 25 for t in texts.values())
        assert all(p.id.startswith(f"{name}-L{level}-") and p.level == level for p in by_split["test"])
    assert fam.problems(fam.levels[-1], "test", 8, seed=1) != fam.problems(fam.levels[-1], "test", 8, seed=0)


@pytest.mark.parametrize("name", GENERATED)
def test_family_replies_that_state_the_reference_are_right_and_others_wrong(name):
    suite = family_suite(FAMILIES[name], "validation", 20)
    for p in suite.problems:
        check = suite.scorer_of(p)
        assert check.correct(f"The answer is {p.answer}.", p.answer), p
        wrong = "Monday" if p.answer == "Sunday" else "Sunday" if p.answer in WEEKDAYS else str(int(p.answer) + 1)
        assert not check.correct(f"The answer is {wrong}.", p.answer), p
        assert not check.correct("I do not know.", p.answer)


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def test_generated_answers_are_right():
    fam = FAMILIES
    for level in (1, 2, 3, 4):
        for p in fam["sequence"].problems(level, "test", 20):
            xs = _numbers(_question(p))
            assert int(p.answer) == xs[-1] + (xs[-1] - xs[-2])
    for p in fam["sequence"].problems(5, "test", 40):
        xs = _numbers(_question(p))
        step, ratio = xs[-1] - xs[-2], xs[-1] // xs[-2]
        rising = xs[-1] > xs[-2]  # level 5 is a falling step or a rising factor
        assert int(p.answer) == (xs[-1] * ratio if rising else xs[-1] + step)
    for p in fam["compare"].problems(1, "test", 20):
        assert int(p.answer) == max(_numbers(_question(p)))
    for p in fam["compare"].problems(5, "test", 20):
        xs = _numbers(_question(p))
        place = {"second": 2, "third": 3}[re.search(r"is (\w+)\?", _question(p)).group(1)]
        assert int(p.answer) == sorted(xs)[place - 1]
    for p in fam["counting"].problems(5, "test", 20):
        assert int(p.answer) == len(re.search(r'"(\w+)"', _question(p)).group(1))
    for p in fam["counting"].problems(1, "test", 20):
        letter, word = re.findall(r'"(\w+)"', _question(p))[:2]
        assert int(p.answer) == word.count(letter)
    factor = {(big, small): k for big, small, k in _TIME + _MEASURE}
    for level in (1, 2, 3):
        for p in fam["units"].problems(level, "test", 20):
            q = _question(p)
            x = (_numbers(q) or [1])[0]  # level 1 asks about one unit
            (k,) = [k for (big, small), k in factor.items()
                    if re.search(rf"\b{big[:-1]}s?\b", q) and re.search(rf"\b{small}\b", q)]
            assert int(p.answer) == x * k
    for p in fam["dates"].problems(1, "test", 14):
        today = next(d for d in WEEKDAYS if d in _question(p))
        assert WEEKDAYS.index(p.answer) == (WEEKDAYS.index(today) + 1) % 7
    for p in fam["dates"].problems(4, "test", 20):
        a, b = _numbers(_question(p))
        assert int(p.answer) == b - a
    for p in fam["wordprob"].problems(2, "test", 20):
        a, b = _numbers(_question(p))[:2]
        assert int(p.answer) == a * b


@pytest.mark.parametrize("text, want", [
    ("Today is Monday, and tomorrow is Wednesday.", "Wednesday"),
    ("The answer is tuesday.", "Tuesday"),
    ("The answer is Friday. Saturday comes after it.", "Friday"),  # the marked clause wins over later text
    ("Sunday", "Sunday"),
    ("It is the weekend.", None),
    ("Mondays are long; the day after is Tuesday", "Tuesday"),  # "Mondays" is not a weekday name
])
def test_weekday_extraction(text, want):
    assert extract_weekday(text) == want


@pytest.mark.parametrize("text, ref, ok", [
    ("Today is Monday, so tomorrow is Tuesday.", "Tuesday", True),
    ("TUESDAY!", "Tuesday", True),
    ("Today is Thursday, so yesterday is Thursday.", "Wednesday", False),
    ("Tuesday comes after Monday.", "Tuesday", False),  # the last weekday named is the one the reply ends on
    ("", "Tuesday", False),
])
def test_weekday_scorer(text, ref, ok):
    assert Weekday().correct(text, ref) is ok


@pytest.mark.parametrize("text, ref, ok", [
    ("3 hours is 3 * 60 = 180 minutes", "180", True),  # units after the number
    ("4 kilograms is 4,000 grams.", "4000", True),  # thousands separator
    ("The answer is 1,000 grams, since 1 kilogram is 1000 grams.", "1000", True),  # the marked clause wins
    ("The answer is 82 is greater.", "82", True),  # trailing text after the marked number
    ("The answer is 9 days, not 10.", "9", True),
    ("There are 180 minutes in 3 hours.", "180", True),  # the question restated after the answer
    ("There are 6 days from October 21 to October 27", "6", True),
    ("There are 2 * 4 = 8 stickers in 2 shelves of 4 stickers each.", "8", True),
    ("It sold 9 + 7 = 16 on Monday and 1 + 2 = 3 on Tuesday, so 16 + 3 = 19 in all.", "19", True),
    ("Eva has a total of 10 hats.", "10", True),  # nothing stated as a result: the last number
    ("There are 180 minutes in 3 hours.", "3", False),
    ("The answer is 18.00 hours.", "3", False),
    ("The lesson is 1 hour and 45 minutes long.", "105", False),
    ("The next number is 16, then 17.", "17", False),  # "is 16" is what it states
    ("I cannot tell.", "0", False),
])
def test_stated_number_on_family_replies(text, ref, ok):
    assert StatedNumber().correct(text, ref) is ok
    assert resolve_scorer("stated-number").correct(text, ref) is ok


def test_final_number_keeps_reading_the_last_number():
    # arith keeps FinalNumber (its labels and reports were made with it): restated questions read as wrong there.
    assert not FinalNumber().correct("There are 180 minutes in 3 hours.", "180")
    assert FinalNumber().correct("3 hours is 3 * 60 = 180 minutes", "180")


def test_mix_draws_every_family_with_its_own_scorer():
    fams = [FAMILIES[n] for n in GENERATED]
    mix = mix_suite(fams, "validation", 3 * len(fams), seed=0)
    assert mix.name == "mix" and len(mix) == 3 * len(fams)
    first_round = {p.id.split("-")[0] for p in mix.problems[: len(fams)]}
    assert first_round == set(GENERATED)  # any prefix of len(families) has every family
    counts = {n: sum(p.id.startswith(n + "-") for p in mix.problems) for n in GENERATED}
    assert set(counts.values()) == {3}
    assert all(p.scorer is not None for p in mix.problems)
    dates_l1 = next(p for p in mix.problems if p.id.startswith("dates-L1-"))
    assert isinstance(mix.scorer_of(dates_l1), Weekday)
    with pytest.raises(TypeError, match="scorer_of"):
        mix.scorer.correct("The answer is 3.", "3")
    # Seeded, and a shorter mix is a prefix of a longer one (pool caches and label files are reused).
    assert mix_suite(fams, "validation", 5, seed=0).problems == mix.problems[:5]
    assert mix_suite(fams, "validation", 3 * len(fams), seed=1).problems != mix.problems
    # A family inside the mix asks the same questions as the family alone.
    alone = {p.id: p for p in family_suite(FAMILIES["units"], "validation", 3).problems}
    assert all(_question(alone[p.id]) == _question(p) for p in mix.problems if p.id.startswith("units-"))


@have_gsm8k
def test_load_suite_mix_has_all_families_including_gsm8k():
    mix = load_suite("mix", split="train", n=2 * len(FAMILIES))
    assert {p.id.split("-")[0] for p in mix.problems} == set(FAMILIES)


@have_gsm8k
def test_gsm8k_family_carves_disjoint_splits_by_level():
    fam = FAMILIES["gsm8k"]
    rows = [json.loads(line) for line in GSM8K_DEFAULT.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = {r["question"]: steps_of(r["answer"]) for r in rows}
    seen: dict[str, str] = {}
    for level in fam.levels:
        for split in ("train", "validation", "test"):
            ps = fam.problems(level, split, 20)
            assert ps == fam.problems(level, split, 20)
            for p in ps:
                q = _question(p).rsplit(" Show your work", 1)[0]
                assert seen.setdefault(q, split) == split  # no question is in two splits
                lo, hi = {1: (1, 2), 2: (3, 3), 3: (4, 4), 4: (5, 99)}[level]
                assert lo <= steps[q] <= hi
    assert sum(1 for s in seen.values() if s == "test") == 80


def test_gsm8k_family_reads_its_file_and_refuses_a_missing_one(tmp_path: Path):
    f = tmp_path / "g.jsonl"
    rows = [{"question": f"Q{i}: how many?", "answer": "a\nb\n#### 1,00" + str(i)} for i in range(200)]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    fam = get_family("gsm8k", f)
    ps = fam.problems(1, "train", 10)
    assert all(p.answer.startswith("100") and "Show your work" in _question(p) for p in ps)
    with pytest.raises(UsageError, match="fewer than"):
        fam.problems(2, "train", 1)  # every solution here has two steps
    with pytest.raises(UsageError, match="does not exist"):
        get_family("gsm8k", tmp_path / "none.jsonl").problems(1, "test", 1)


def test_load_suite_by_family():
    assert load_suite("arith", family="arith", n=10) == load_suite("arith", n=10)
    units = load_suite("arith", family="units", split="validation", n=6, levels=[3, 1, 3])
    assert units.name == "units" and [p.level for p in units.problems] == [1, 3] * 3
    with pytest.raises(UsageError, match="unknown family 'nope': choose from arith, "):
        load_suite("arith", family="nope")
    with pytest.raises(UsageError, match="both pick a suite"):
        load_suite("gsm8k", family="units")
    with pytest.raises(UsageError, match="has levels"):
        load_suite("arith", family="dates", levels=[9])
    with pytest.raises(UsageError, match="has no levels"):
        load_suite("mix", levels=[1])
    with pytest.raises(UsageError, match="mix"):
        load_suite("mixed")


@pytest.mark.parametrize("args", [
    ("eval", "--family", "nope"),
    ("label", "-o", "x.jsonl", "--family", "nope"),
    ("tune-policy", "-o", "p.json", "--family", "nope"),
])
def test_cli_unknown_family_is_one_line_naming_the_choices(args, tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "edge_adapt", *args], capture_output=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    err = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), proc.stderr
    assert "unknown family 'nope': choose from " + ", ".join(FAMILIES) in err[0]


def test_measure_smoke_reports_a_row_per_level_from_real_replies():
    from edge_adapt.tasks.measure import measure

    rows = list(measure([FAMILIES["sequence"]], n=2, max_tokens=8, threads=1, batch=2))
    assert [r.level for r in rows] == list(FAMILIES["sequence"].levels)
    assert all(r.prompts == 2 and 0 <= r.right <= 2 and 1 <= r.mean_tokens <= 8 for r in rows)
    assert rows[0].markdown().startswith("| sequence | 1 | 2 | ")


def test_every_problem_of_a_family_or_a_mix_carries_its_familys_budget():
    mix = load_suite("mix", split="validation", n=18)
    assert {p.id.split("-")[0]: p.max_tokens for p in mix.problems} == {n: f.max_tokens for n, f in FAMILIES.items()}
    assert mix.budget() is None and mix.budget(50) == 50
    assert (mix.shortest_budget(), mix.longest_budget()) == (64, 256)
    steps = load_suite("arith", family="steps", split="validation", n=5)
    assert steps.budget() == 256 and steps.longest_budget(100) == 100
    assert load_suite("arith", split="validation", n=5).budget() == 96


def test_a_split_that_runs_dry_is_refused_without_drawing_for_hours():
    """A level has finitely many distinct questions: asking for far more stops once draws find nothing new (it
    used to draw 200 per problem asked for: 2e10 draws for --prompts 100000000)."""
    fam = FAMILIES["arith"]
    calls = 0
    level1 = fam.generators[1]

    def counted(r):
        nonlocal calls
        calls += 1
        return level1(r)

    dry = replace(fam, generators={**fam.generators, 1: counted})
    with pytest.raises(UsageError, match="fewer than 100000000 distinct test problems"):
        dry.problems(1, "test", 10**8)
    assert calls < 10**6  # the old bound was 2e10 draws
    assert dry.problems(1, "test", 10) == fam.problems(1, "test", 10)  # what can be drawn is drawn as before



def test_a_user_suite_whose_ids_look_like_a_familys_is_no_family(tmp_path: Path):
    """A user's `arith-L1-mine` is the user's problem, not arith's: the eval report gives no per-family calibration
    rows for it and its samples are keyed by its own suite (another suite may judge the same replies differently),
    while a mix's problems keep their families and share their keys with the families' own pools."""
    from edge_adapt.eval.pool import PoolSample, PoolSettings, PromptPool, sample_key
    from edge_adapt.eval.report import calibrations

    def pool(p):
        def s(i: int, ok: bool) -> PoolSample:
            return PoolSample(index=i, temperature=0.7, seed=i, text="", n_tokens=1, logprobs=(-1.0,), finish="eos",
                              scores=(), end_score=0.3 + 0.2 * ok, selfeval_tokens=(1.0,), extracted=None, correct=ok)
        return PromptPool("k-" + p.id, p.id, p.level, p.answer, 3, (s(0, True), s(1, False)), s(-1, True), 0.0)

    f = tmp_path / "famids.jsonl"
    f.write_text('{"id": "arith-L1-mine", "prompt": "What is 2+2?", "answer": 4}\n'
                 '{"id": "units-L9-mine", "prompt": "What is 3+3?", "answer": 6}\n')
    mine = load_suite(str(f))
    assert [p.family for p in mine.problems] == [None, None]
    scopes = [c.scope for c in calibrations([pool(p) for p in mine.problems], (), mine)]
    assert not [s for s in scopes if s.startswith("family")], scopes
    settings = PoolSettings(k=2)
    p = mine.problems[0]
    assert sample_key("fp", mine.name, settings, p) != sample_key("fp", "arith", settings, p)

    mix = mix_suite([FAMILIES[n] for n in GENERATED], "validation", len(GENERATED))
    assert sorted(q.family for q in mix.problems) == sorted(GENERATED)
    scopes = [c.scope for c in calibrations([pool(q) for q in mix.problems], (), mix)]
    assert [s for s in scopes if s.startswith("family")] == [f"family {n}" for n in sorted(GENERATED)]
    q = next(q for q in mix.problems if q.family == "arith")
    assert sample_key("fp", "mix", settings, q) == sample_key("fp", "arith", settings, q)


def test_label_cuts_fit_each_replys_own_budget_not_the_shortest():
    """A mix's 256-token families are cut at 64 too (its 64-token ones never pass 64): the default 64 was dropped
    for every family, and `--cut 64` refused with "cuts [16, 32, 64] must be below max_tokens 64"."""
    mix = load_suite("mix", split="validation", n=18)
    assert mix.points_below_budget("--cut", [16, 32, 64, 256], given=False, per_reply=True) == [16, 32, 64]
    assert mix.points_below_budget("--cut", [16, 32, 64], given=True, per_reply=True) == [16, 32, 64]
    with pytest.raises(UsageError, match=r"^--cut 64 must be below --max-tokens 64$"):
        mix.points_below_budget("--cut", [16, 64], 64, per_reply=True)
    # A pool's prune points apply to every reply: still the shortest budget's.
    assert mix.points_below_budget("prune points", [16, 32, 64], given=False) == [16, 32]
