"""Random-weight models of a named shape (edge_adapt.bench.random_model): the GPU benchmarks' stand-in for
models that cannot travel to the machine."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import gguf
import pytest

from edge_adapt.bench.random_model import SHAPES, main, save_tokenizer, write_random_model
from edge_adapt.engine import Engine, Finished, SamplingParams
from edge_adapt.engine.default_model import default_model_path
from edge_adapt.engine.gguf_file import inspect_gguf
from edge_adapt.errors import UsageError


@pytest.mark.parametrize("qtype", ["q8_0", "f16"])
def test_a_random_model_of_a_shape_loads_and_generates(tmp_path, qtype, engine):
    tokenizer = save_tokenizer(tmp_path / "tokenizer.gguf")  # what travels to a machine without the default model
    assert tokenizer.stat().st_size < 4 << 20
    shape = dataclasses.replace(SHAPES["tiny"], vocab=SHAPES["tiny"].vocab + 100)  # padded past the tokenizer's
    path = write_random_model(tmp_path / "tiny.gguf", shape, qtype, tokenizer=tokenizer)
    info = inspect_gguf(path)
    assert (info.n_layers, info.n_embd, info.n_head, info.n_head_kv, info.n_vocab) == (2, 64, 4, 2, 49252)
    with Engine(model=path, parallel=3, ctx=128, device="cpu") as e:
        assert e.model.n_vocab == 49252
        text = "Write two sentences about rivers."
        assert e.tokenize(text) == engine.tokenize(text)  # the default model's tokenizer
        done = [ev for ev in e.generate("Hello", SamplingParams(temperature=0.8, ignore_eos=True), n=3, max_tokens=6)
                if isinstance(ev, Finished)]
    assert [d.n_tokens for d in done] == [6, 6, 6]


def test_the_default_models_shape_has_its_tensors_and_types(tmp_path):
    """Speed is a matter of shapes and types: the stand-in must have exactly the default model's."""
    def layout(path):
        return sorted((t.name, tuple(int(x) for x in t.shape), t.tensor_type) for t in gguf.GGUFReader(path).tensors)

    path = write_random_model(tmp_path / "smollm2.gguf", SHAPES["smollm2-135m"])
    assert layout(path) == layout(default_model_path())


def test_random_model_refuses_to_overwrite_and_bad_inputs(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as e:
        main([str(out), "--shape", "tiny"])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {out} already exists; pass --force to overwrite it\n"
    assert out.read_bytes() == b"keep me"
    with pytest.raises(SystemExit):
        main([str(tmp_path / "new.gguf"), "--shape", "tiny", "--tokenizer", str(out)])
    assert "cannot read it as a GGUF file" in capsys.readouterr().err
    with pytest.raises(UsageError, match="vocabulary of 100 is smaller"):
        write_random_model(tmp_path / "small.gguf", dataclasses.replace(SHAPES["tiny"], vocab=100))
    assert not (tmp_path / "new.gguf").exists() and not (tmp_path / "small.gguf").exists()


def test_the_step_profile_accounts_for_a_step(tmp_path):
    """`edge-adapt bench --only profile` on a small random model: every part measured, none over the step."""
    from edge_adapt.bench.engine import BenchConfig, render, step_profile

    path = write_random_model(tmp_path / "tiny.gguf", SHAPES["tiny"])
    rows = step_profile(BenchConfig(model=path, tokens=8, repeats=1), sizes=(1, 4), sampled=4)
    assert [(r["sequences"], r["temperature"]) for r in rows] == [(1, 0.0), (4, 0.0), (4, 0.8)]
    for r in rows:
        assert r["step"] > 0 and all(r[k] > 0 for k in ("decode", "logits_copy", "sampling", "logprobs"))
        waited = r["logits_wait"] if r["logprobs_beside"] else r["logits_copy"]  # the copy's share of the step
        assert r["decode"] + waited + r["sampling"] < r["step"] and r["rest"] > -0.05 * r["step"]
    assert "step profile  4 forks:" in render({"profile": rows})
    assert "step profile  4 forks T=0.8:" in render({"profile": rows})


def test_the_step_profile_does_not_count_its_warm_up_run(tmp_path, monkeypatch):
    """The profile kept the best of its repeats and the warm-up run before them. Here every run after an engine's
    first is slowed by 300 ms a step (a step of the tiny model takes well under that even on a busy machine): a
    best that is faster came from the warm-up."""
    from edge_adapt.bench.engine import BenchConfig, step_profile

    generate, runs = Engine.generate, []

    def slowed_after_the_first(self, *args, **kwargs):
        runs.append(self)
        for ev in generate(self, *args, **kwargs):
            if runs.count(self) > 1:
                time.sleep(0.3)
            yield ev

    monkeypatch.setattr(Engine, "generate", slowed_after_the_first)
    path = write_random_model(tmp_path / "tiny.gguf", SHAPES["tiny"])
    rows = step_profile(BenchConfig(model=path, tokens=8, repeats=1), sizes=(1,), sampled=0)
    assert len(runs) == 2 and rows[0]["step"] >= 300


def test_clients_against_forks_runs_both_sides_on_one_engine(tmp_path):
    """`edge-adapt bench --only clients`: n one-sample requests through the scheduler and one request of n forks,
    greedy and sampled, both sides timed, the ratio theirs."""
    from edge_adapt.bench.engine import BenchConfig, clients_vs_forks, render

    path = write_random_model(tmp_path / "tiny.gguf", SHAPES["tiny"])
    rows = clients_vs_forks(BenchConfig(model=path, tokens=8, repeats=1), n=4)
    assert [(r["requests"], r["temperature"], r["tokens"]) for r in rows] == [(4, 0.0, 8), (4, 0.8, 8)]
    for r in rows:
        assert r["forks_tok_s"] > 0 and r["clients_tok_s"] > 0
        assert r["ratio"] == pytest.approx(r["clients_tok_s"] / r["forks_tok_s"])
    assert "4 requests of 1 vs 1 of 4 at T=0.8:" in render({"clients": rows})


def test_bench_reports_each_section_as_it_ends_with_its_settings_as_json_values(tmp_path):
    """A full `edge-adapt bench` takes minutes: each section's result is an event the moment it ends (a Ctrl-C
    keeps what was printed), and the settings come back with their JSON types, not as strings."""
    from edge_adapt.bench import run_job
    from edge_adapt.bench.engine import BenchConfig, config_json
    from edge_adapt.progress import finish

    path = write_random_model(tmp_path / "tiny.gguf", SHAPES["tiny"])
    events: list = []
    results = finish(run_job(BenchConfig(model=path, threads=1, samples=2, tokens=8, repeats=1),
                             {"batched", "single_stream"}), events.append)
    assert [(e.info, e.done, e.total, e.message is not None) for e in events] == [
        ("single_stream", 0, 2, False), ("single_stream", 1, 2, True), ("batched", 1, 2, False), ("batched", 2, 2, True)]
    assert events[1].message.startswith("single stream   ours ") and events[3].message.startswith("forked batch ")
    assert results["config"] == {"model": str(path), "threads": 1, "device": "cpu", "samples": 2, "tokens": 8,
                                 "repeats": 1}
    assert set(results) == {"config", "single_stream", "batched"}
    assert json.loads(json.dumps(config_json(BenchConfig())))["model"] is None  # the default model: null, not "None"


def test_bench_cli_prints_sections_as_they_end_and_json_as_one_document(tmp_path):
    import subprocess
    import sys

    path = write_random_model(tmp_path / "tiny.gguf", SHAPES["tiny"])
    args = [sys.executable, "-m", "edge_adapt", "bench", "--only", "batched", "--only", "single_stream", "--model",
            str(path), "--tokens", "8", "--samples", "2", "--repeats", "1", "--threads", "1"]
    text = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert text.returncode == 0, text.stderr
    assert [line.split()[0] for line in text.stdout.splitlines()] == ["single", "forked"]
    assert text.stderr.splitlines() == ["bench: single_stream (1 of 2) ...", "bench: batched (2 of 2) ..."]
    as_json = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=300)
    assert as_json.returncode == 0, as_json.stderr
    out = json.loads(as_json.stdout)
    assert out["config"]["threads"] == 1 and out["config"]["tokens"] == 8 and out["batched"]["ratio"] > 0


def test_a_failed_peak_rss_child_says_why_in_one_line(tmp_path):
    """What the parent's checks let through (here a thread count the engine refuses) fails in the child: its last
    line of stderr is the reason given."""
    from edge_adapt.bench.engine import BenchConfig, rss_vs_plan
    from edge_adapt.errors import EngineError

    path = write_random_model(tmp_path / "tiny.gguf", SHAPES["tiny"])
    with pytest.raises(EngineError, match=r"^the peak RSS run of 1 x 2048 tokens failed: engine options: threads: "
                                          r"Input should be greater than or equal to 1$"):  # no class path first
        rss_vs_plan(BenchConfig(model=path, threads=0, tokens=8))


def test_bench_help_says_which_sections_each_option_sets():
    """--tokens and --samples do not reach every section: the help must not say they do."""
    import typer.main

    from edge_adapt.cli import app

    helps = {p.name: p.help for p in typer.main.get_command(app).commands["bench"].params}
    assert "single_stream and batched" in helps["tokens"] and "at most 64" in helps["tokens"]
    assert "strategies" in helps["tokens"] and "fork" in helps["tokens"]
    assert "batched" in helps["samples"] and "rss" in helps["samples"]


def test_each_side_of_the_batched_ratio_is_the_best_of_repeats(tmp_path, monkeypatch):
    """`--repeats 2`: the batched side and the sequential baseline both run twice after the warm-up, not the batched
    side twice and the baseline once (a ratio biased upward)."""
    from edge_adapt.bench.engine import BenchConfig, batched_vs_sequential

    path = write_random_model(tmp_path / "tiny.gguf", SHAPES["tiny"])
    calls = {"batched": 0, "sequential": 0}
    generate = Engine.generate

    def counted(self, prompt, params, *args, n=1, **kwargs):
        calls["batched" if n > 1 else "sequential"] += 1
        return generate(self, prompt, params, *args, n=n, **kwargs)

    monkeypatch.setattr(Engine, "generate", counted)
    batched_vs_sequential(BenchConfig(model=path, threads=1, samples=2, tokens=8, repeats=2))
    assert calls == {"batched": 1 + 2, "sequential": 2 * 2}  # the warm-up, then 2 runs of 2 samples each side


def test_prune_against_best_of_n_is_the_best_of_repeats(tmp_path, monkeypatch):
    """`--only strategies` with `--repeats 2`: best-of-n and prune each run twice, the fastest of each timed."""
    import edge_adapt.bench.strategies as strategy_bench

    runs: list[str] = []
    run_strategy = strategy_bench.run_strategy

    def counted(e, prompt, cfg, *args, **kwargs):
        runs.append(cfg.strategy)
        return run_strategy(e, prompt, cfg, *args, **kwargs)

    monkeypatch.setattr(strategy_bench, "run_strategy", counted)
    with Engine(model=write_random_model(tmp_path / "tiny.gguf", SHAPES["tiny"]), parallel=6, ctx=128) as e:
        r = strategy_bench.prune_vs_best_of_n(e, n=4, k=2, at=4, max_tokens=8, repeats=2)
    assert sorted(runs) == ["best-of-n", "best-of-n", "prune", "prune"] and r["repeats"] == 2
    assert r["wall_ratio"] == pytest.approx(r["prune_s"] / r["best_of_n_s"])


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A converted tiny Llama: trained for 512 tokens, a vocabulary of 448."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from convert_fixtures import build_model

    from edge_adapt.convert import convert_model

    root = tmp_path_factory.mktemp("small")
    out = root / "small.gguf"
    convert_model(build_model(root / "hf", "llama"), out, type="f16")
    return out


def test_bench_refuses_what_a_small_model_cannot_hold_in_its_own_terms(small_model, capsys):
    """Was: `--ctx 1024 exceeds the model's training context 512` (bench has no --ctx) for --tokens 600, and the
    rss section's child failing with a class path in its line."""
    from test_hostile import inproc

    from edge_adapt.bench.engine import BenchConfig, batched_vs_sequential, rss_vs_plan, single_stream

    wanted = "--tokens 600 needs a context of 1024 tokens per sequence, more than the model's training context of 512: "
    for section in (single_stream, batched_vs_sequential):
        with pytest.raises(UsageError, match=f"^{wanted}use --tokens 192 or fewer$"):
            section(BenchConfig(model=small_model, threads=1, samples=2, tokens=600))
    rc, _, err = inproc(capsys, "bench", "-m", str(small_model), "--only", "single_stream", "--tokens", "600",
                        "--threads", "1")
    assert rc == 2 and "Traceback" not in err, err
    assert err.splitlines() == ["bench: single_stream (1 of 1) ...", f"error: {wanted}use --tokens 192 or fewer"]
    with pytest.raises(UsageError, match=r"^the rss section's 1 x 2048 run needs a context of 2048 tokens per "
                                         r"sequence, .* 512: it cannot run on this model"):
        rss_vs_plan(BenchConfig(model=small_model, threads=1, tokens=8))


def test_fork_cost_runs_on_a_model_with_a_small_vocabulary(small_model):
    """Was: the synthetic prompt's ids 1000 to 1255, refused by any vocabulary smaller than that."""
    from edge_adapt.bench.engine import BenchConfig, fork_cost

    r = fork_cost(BenchConfig(model=small_model, threads=1, repeats=1), reps=2)
    assert all(r[k] > 0 for k in ("seq_cp_split_s", "seq_cp_unified_s", "llama_save_load_s"))


def test_backend_bench_refuses_zero_concurrency_and_parallel(capsys):
    """0 was taken for the default (K + 1 requests in flight) and the run went on: refused as --prompts 0 is,
    before anything runs."""
    from edge_adapt.bench.backend import main as backend_main

    for flag in ("--concurrency", "--parallel"):
        assert backend_main([flag, "0", "--prompts", "1", "-k", "2", "--max-tokens", "4", "--threads", "1"]) == 2
        assert capsys.readouterr().err == f"error: {flag} must be a whole number >= 1, got 0\n"
