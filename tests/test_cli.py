"""The command line as a user meets it: answers, JSON, and a one-line error with a non-zero exit for bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_adapt.engine.default_model import default_model_path
from test_hostile import inproc, one_error


def cli(*args: str | bytes, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "edge_adapt", *args], input=stdin, capture_output=True,
                          timeout=300, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess[bytes], fragment: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert err.startswith("error: "), err  # not even a blank line first
    assert fragment in lines[0], err


def test_run_answers_with_the_default_model():
    proc = cli("run", "What is 2 + 2?", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().strip()


def test_run_json_reports_samples_tokens_and_timing():
    proc = cli("run", "Name a fruit.", "-n", "3", "--temp", "0.8", "--max-tokens", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["samples"]) == 3
    assert all(1 <= s["tokens"] <= 10 for s in out["samples"])
    assert out["usage"]["generated_tokens"] == sum(s["tokens"] for s in out["samples"])
    assert out["timing"]["tokens_per_s"] > 0


def test_info_prints_facts_and_a_plan():
    proc = cli("info", "--json", "--mem-budget", "1GB", "--ctx", "512")
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["architecture"] == "llama" and facts["layers"] == 30 and facts["quantization"] == "Q4_1"
    assert facts["plan"]["parallel"] > 1 and facts["plan"]["total_bytes"] <= 2**30


def test_info_describes_an_adapter_and_takes_the_model_as_run_does():
    from edge_adapt.engine.default_model import default_model_path, default_selfeval_adapter

    adapter = str(default_selfeval_adapter())
    proc = cli("info", "--json", "--model", adapter)  # --model as `run` takes it, beside the MODEL argument
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert (facts["kind"], facts["rank"], facts["architecture"]) == ("aLoRA", 8, "llama")
    assert len(facts["invocation_tokens"]) == 3 and "attn_q" in facts["targets"]
    assert facts["edge_adapt"]["self_eval.suffix"] == "<|im_end|>Restart"
    assert_one_line_error(cli("info", adapter, "-n", "4"), "no memory plan of its own")
    assert_one_line_error(cli("info", adapter, "--model", str(default_model_path())), "give the model once")


def _renamed(tmp_path: Path, renames: dict[bytes, bytes]) -> Path:
    """The shipped adapter with tensors renamed in place (same length, so the file stays well-formed)."""
    from edge_adapt.engine.default_model import default_selfeval_adapter

    data = default_selfeval_adapter().read_bytes()
    for old, new in renames.items():
        assert len(old) == len(new) and data.count(old) == 1
        data = data.replace(old, new)
    path = tmp_path / "renamed.gguf"
    path.write_bytes(data)
    return path


def test_info_refuses_half_a_lora_pair_as_run_does_and_takes_any_tensor_name(tmp_path: Path):
    half = _renamed(tmp_path, {b"blk.0.attn_k.weight.lora_a": b"xxxxxxxxxxxxxxxxxxx.lora_a"})
    for args in (("info", str(half)), ("info", "--json", str(half)),
                 ("run", "hi", "--strategy", "best-of-n", "-n", "2", "--adapter", str(half))):
        assert_one_line_error(cli(*args), f"{half}: adapter has xxxxxxxxxxxxxxxxxxx.lora_a without its other half")
    both = _renamed(tmp_path, {b"blk.0.attn_k.weight.lora_a": b"xxxxxxxxxxxxxxxxxxx.lora_a",
                               b"blk.0.attn_k.weight.lora_b": b"xxxxxxxxxxxxxxxxxxx.lora_b"})
    proc = cli("info", "--json", str(both))  # a whole pair: described (run refuses it: the model has no such tensor)
    assert proc.returncode == 0, proc.stderr
    targets = json.loads(proc.stdout)["targets"]
    assert "xxxxxxxxxxxxxxxxxxx" in targets and "attn_k" in targets  # blk.1's attn_k and later blocks


def test_info_refuses_what_run_would_and_names_sizes_as_given(tmp_path: Path):
    from edge_adapt.engine.default_model import default_selfeval_adapter

    assert_one_line_error(cli("info", "--ctx", "100000"), "--ctx 100000 exceeds the model's training context 8192")
    assert_one_line_error(cli("info", "--mem-budget", "1KB"), "--mem-budget 1024 bytes is too small")
    assert_one_line_error(cli("info", "--mem-budget", "1.5MB"), "--mem-budget 1.5 MiB is too small")
    assert_one_line_error(cli("info", str(default_selfeval_adapter()), "--ctx", "512"), "no memory plan of its own")


def test_info_escapes_control_characters_from_the_gguf(tmp_path: Path):
    """Metadata is the file's, not ours: an ANSI sequence in it must not reach the terminal as one."""
    from lora_files import make_lora

    adapter = make_lora(tmp_path / "ansi.gguf", meta={"self_eval.suffix": "\x1b[2J\x1b[31mfake\tline\nok café"})
    proc = cli("info", str(adapter))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "\x1b" not in out and "\t" not in out
    assert "edge_adapt.self_eval.suffix = \\x1b[2J\\x1b[31mfake\\tline\\nok café\n" in out
    assert json.loads(cli("info", "--json", str(adapter)).stdout)["edge_adapt"]["self_eval.suffix"].startswith("\x1b[2J")


def test_missing_model_file(tmp_path: Path):
    assert_one_line_error(cli("run", "hi", "--model", str(tmp_path / "nope.gguf")), "no such file")


def test_file_that_is_not_gguf(tmp_path: Path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip")
    assert_one_line_error(cli("run", "hi", "--model", str(bad)), "not a GGUF file")


def test_truncated_gguf(tmp_path: Path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_model_path().read_bytes()[: 8 << 20])
    assert_one_line_error(cli("run", "hi", "--model", str(cut)), "truncated GGUF")


def test_gguf_cut_inside_its_metadata(tmp_path: Path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_model_path().read_bytes()[:4000])
    assert_one_line_error(cli("info", str(cut)), "truncated GGUF")


def test_unsupported_architecture(tmp_path: Path):
    import gguf
    import numpy as np

    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(cli("run", "hi", "--model", str(path)), "unsupported architecture 'bert'")


def test_prompt_longer_than_context():
    assert_one_line_error(cli("run", "word " * 400, "--ctx", "256", "--max-tokens", "8"), "do not fit")


def test_budget_too_small():
    assert_one_line_error(cli("run", "hi", "--mem-budget", "50MB"), "too small")
    assert_one_line_error(cli("info", "--mem-budget", "lots"), "cannot read memory size")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("run", "hi", "--temp", "-1"), "--temp"),
        (("run", "hi", "--top-p", "0"), "top_p"),
        (("run", "hi", "-n", "0"), "-n"),
        (("run", "hi", "--device", "tpu"), "--device"),
        (("run", "hi", "--strategy", "magic"), "unknown strategy"),
        (("run", "hi", "--strategy", "prune", "--budget", "4", "-k", "9"), "keep (9) must be <= budget"),
        (("run", "hi", "--strategy", "adaptive", "--threshold", "1.5"), "threshold"),
        (("bench", "--only", "everything"), "--only"),
        (("run", "hi", "--strategy", "beam", "--budget", "6"), "multiple of the beam width M (4)"),
        (("run", "hi", "--strategy", "revise", "--budget", "1"), "at least 2"),
        (("run", "hi", "--strategy", "auto", "--policy", "/nonexistent/policy.json"), "cannot read policy"),
        (("tune-policy", "-o", "p.json", "--report", "r"), "need --test-split"),
        (("tune-policy", "-o", "p.json", "--budget", "1"), "at least 2"),
        (("tune-policy", "-o", "p.json", "--test-split", "test", "--live", "warp"), "unknown strategy 'warp'"),
    ],
)
def test_invalid_option_values(args: tuple[str, ...], fragment: str):
    assert_one_line_error(cli(*args), fragment)


def test_non_utf8_prompt_on_stdin():
    assert_one_line_error(cli("run", "-", stdin=b"caf\xe9 au lait"), "not valid UTF-8")


def test_non_utf8_prompt_argument():
    assert_one_line_error(cli("run", os.fsdecode(b"caf\xe9")), "not valid UTF-8")


def test_cuda_requested_on_a_cpu_build():
    import llama_cpp.llama_cpp as ll

    if ll.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build has a GPU backend")
    assert_one_line_error(cli("run", "hi", "--device", "cuda"), "no GPU backend")


def test_bench_refuses_a_bad_model_or_device_in_one_line_before_any_section(tmp_path: Path):
    """As the other sections did, also the peak-RSS one, whose runs are child processes."""
    import llama_cpp.llama_cpp as ll

    from edge_adapt.engine.default_model import default_selfeval_adapter

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"garbage\n")
    for model, fragment in ((garbage, "not a GGUF file"), (tmp_path / "nope.gguf", "no such file"),
                            (default_selfeval_adapter(), "this is an adapter GGUF, not a model")):
        assert_one_line_error(cli("bench", "--only", "rss", "--model", str(model)), fragment)
    if not ll.llama_supports_gpu_offload():
        assert_one_line_error(cli("bench", "--only", "rss", "--device", "cuda"), "no GPU backend")


def _policy(path: Path, model: str, budgets: dict) -> Path:
    path.write_text(json.dumps({"format": "edge-adapt-policy/1", "model": model, "bin_edges": [0.2, 0.4, 0.6, 0.8],
                                "budgets": budgets}))
    return path


def test_auto_policy_errors(tmp_path: Path):
    row = {"4": [{"strategy": "probe"}] * 5}
    other = _policy(tmp_path / "other.json", "llama:1:2:F16", row)
    assert_one_line_error(cli("run", "hi", "--strategy", "auto", "--policy", str(other)), "tuned for model llama:1:2:F16")
    from edge_adapt.engine.gguf_file import inspect_gguf

    info = inspect_gguf(default_model_path())
    mine = _policy(tmp_path / "mine.json", f"{info.architecture}:{info.n_params}:{info.n_vocab}:{info.file_type}", row)
    assert_one_line_error(cli("run", "hi", "--strategy", "auto", "--budget", "2", "--policy", str(mine)),
                          "budget 2 is too small for this policy")
    (tmp_path / "bad.json").write_text("{not json")
    assert_one_line_error(cli("run", "hi", "--strategy", "auto", "--policy", str(tmp_path / "bad.json")), "not valid JSON")
    proc = cli("run", "What is 2 + 3?", "--strategy", "auto", "--budget", "4", "--policy", str(mine), "--show-scores",
               "--max-tokens", "16")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "difficulty bin" in proc.stdout.decode()


def test_tune_policy_never_overwrites_without_force(tmp_path: Path):
    existing = tmp_path / "policy.json"
    existing.write_text("mine")
    assert_one_line_error(cli("tune-policy", "-o", str(existing)), "exists")
    assert existing.read_text() == "mine"


@pytest.mark.slow
def test_tune_policy_end_to_end(tmp_path: Path):
    """Tiny pools on both splits, a policy, its held-out report, a live auto run and a compute-matched
    comparison (the default model standing in for the larger one: greedy either way, so it must score
    exactly what the pool's greedy scored)."""
    out, report = tmp_path / "policy.json", tmp_path / "report"
    proc = cli("tune-policy", "-o", str(out), "--prompts", "10", "-k", "2", "--max-tokens", "24", "--prune-at", "8",
               "--budget", "2", "--budget", "3", "--test-split", "test", "--test-prompts", "5", "--report", str(report),
               "--live", "auto", "--live-prompts", "2", "--live-budget", "3", "--compare-model", str(default_model_path()),
               "--cache", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr.decode()
    policy = json.loads(out.read_text())
    assert set(policy["budgets"]) == {"2", "3"} and len(policy["budgets"]["3"]) == 5
    data = json.loads((report / "report.json").read_text())
    assert data["compare"]["accuracy"] == pytest.approx(data["test"]["greedy"])
    assert data["compare"]["tokens"] == pytest.approx(data["test"]["greedy_tokens"])
    (auto,) = [r for r in data["live"] if r["strategy"] == "auto"]
    assert auto["prompts"] == 2 and sum(auto["bins"].values()) == 2
    assert "Compute-matched comparison" in (report / "report.md").read_text()


# -- one run path for every strategy, sized by the library -----------------------------------------------------
def _run_in_process(*args: str) -> tuple[int, str]:
    """`edge-adapt run ...` in this process (the model loads in well under a second; a new interpreter per case
    would cost more than the run)."""
    from typer.testing import CliRunner

    from edge_adapt.cli import app

    result = CliRunner().invoke(app, ["run", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.mark.slow
@pytest.mark.parametrize("budget", (None, 2, 4))  # None: the strategy's defaults (budget 8)
@pytest.mark.parametrize("strategy", sorted(set(__import__("edge_adapt.strategies", fromlist=["STRATEGIES"]).STRATEGIES)))
def test_every_strategy_runs_through_the_cli_at_its_defaults_and_small_budgets(strategy: str, budget: int | None):
    """The CLI sizes the engine from the strategy's own declaration (edge_adapt.sizing): no strategy may find too
    few sequences or too short a context, at its default settings or at budgets 2, 4 and (by default) 8."""
    # 40 tokens: past the default prune point (32), so the pruning strategies run at their defaults too; a short
    # question, whose samples mostly end within a few tokens, keeps the 36 runs quick.
    args = ["What is 2 + 3?", "--strategy", strategy, "--max-tokens", "40", "--json"] + (
        ["--budget", str(budget)] if budget else [])
    if strategy == "single" and budget:  # one sample whatever the budget: refused rather than ignored
        from edge_adapt.errors import UsageError

        with pytest.raises(UsageError, match="--budget is not used by strategy single"):
            _run_in_process(*args)
        return
    code, out = _run_in_process(*args)
    assert code == 0, out
    data = json.loads(out)
    assert data["strategy"] == strategy and data["chosen"]["text"] == next(
        s["text"] for s in data["samples"] if s["index"] == data["chosen"]["sample"])
    assert data["usage"]["samples_started"] >= 1


def test_run_json_has_one_schema_for_plain_and_strategy_runs():
    plain = json.loads(cli("run", "Name a fruit.", "-n", "2", "--temp", "0.8", "--max-tokens", "6", "--json").stdout)
    strat = json.loads(cli("run", "Name a fruit.", "--strategy", "best-of-n", "-n", "2", "--max-tokens", "6",
                           "--json").stdout)
    # The schema is the one the README documents (its ```json example of run --json).
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    documented = json.loads(readme.split("```json\n", 1)[1].split("```", 1)[0])
    assert set(plain) == set(strat) == set(documented)
    assert set(plain["samples"][0]) == set(strat["samples"][0]) == set(documented["samples"][0])
    assert set(plain["usage"]) == set(strat["usage"]) == set(documented["usage"])
    assert set(strat["chosen"]) == set(documented["chosen"]) and set(plain["timing"]) == set(documented["timing"])
    assert plain["strategy"] is None and plain["chosen"] is None and len(plain["samples"]) == 2
    # -n with a strategy is its budget
    assert strat["strategy"] == "best-of-n" and strat["usage"]["samples_started"] == 2
    assert all(len(s["scores"]) == 1 for s in strat["samples"]) and strat["chosen"]["p_keep"] is not None


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("run", "hi", "--strategy", "best-of-n", "-n", "4", "--budget", "8"), "-n 4 and --budget 8 disagree"),
        (("run", "hi", "--stop", ""), "--stop takes a non-empty string"),
        (("run", "hi", "--policy", "p.json"), "--policy is only used by --strategy auto"),
        (("run", "hi", "--temp", "inf"), "temperature (--temp) must be a finite number"),
        (("run", "hi", "--temp", "1000"), "temperature (--temp) must be a finite number, 0 (greedy) or in [1e-6, 100]"),
        (("run", "hi", "--strategy", "best-of-n", "--top-p", "1.5"), "top_p (--top-p) must be in (0, 1]"),
        (("eval", "--temp", "nan"), "temperature (--temp) must be a finite number"),
        (("label", "-o", "x.jsonl", "--temp", "0"), "a pool samples: temperature must be > 0"),
        (("bench", "--only", "batched", "--samples", "300"), "'--samples': Input should be less than or equal to 255"),
        (("run", "hi", "--adapter", "missing.gguf"), "--adapter is only used with --strategy"),
        (("run", "hi", "-n", "2", "--keep", "1", "--show-scores"), "--keep, --show-scores are only used with --strategy"),
        (("run", " \n"), "the prompt is empty"),
        (("run", "hi", "--threads", "100000"), "'--threads': Input should be less than or equal to 512"),
        (("eval", "--seed", "-1"), "eval: seed: Input should be greater than or equal to 0"),
        (("train", "l.jsonl", "--validation", "v.jsonl", "-o", "o", "--seed", "99999999999999999999999"),
         "seed: Input should be less than"),
    ],
)
def test_sampling_and_run_options_are_checked_once(args: tuple[str, ...], fragment: str, tmp_path: Path):
    assert_one_line_error(cli(*args), fragment)


def test_run_config_file_values_win_over_flags_not_given(tmp_path: Path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('strategy = "best-of-n"\nbudget = 2\nmax_tokens = 5\nseed = 7\n')
    out = json.loads(cli("run", "Name a fruit.", "--config", str(cfg), "--json").stdout)
    assert all(s["tokens"] <= 5 for s in out["samples"]) and out["usage"]["samples_started"] == 2
    again = json.loads(cli("run", "Name a fruit.", "--config", str(cfg), "--max-tokens", "3", "--json").stdout)
    assert all(s["tokens"] <= 3 for s in again["samples"])


def test_report_and_output_directories_are_checked_before_any_work(tmp_path: Path):
    """An earlier report is not overwritten without --force; a file where a directory should be, or below one,
    is one line, before a model loads or a pool is sampled."""
    earlier = tmp_path / "report"
    earlier.mkdir()
    (earlier / "report.md").write_text("an earlier run's report\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    labels = tmp_path / "labels.jsonl"
    labels.write_text("{}\n")
    eval_ = ("eval", "--prompts", "1", "-k", "2", "--cache", str(tmp_path / "cache"))
    for args, fragment in [
        ((*eval_, "--out", str(earlier)), f"{earlier} already exists and is not empty; pass --force to overwrite it"),
        ((*eval_, "--out", str(a_file)), f"{a_file} exists and is not a directory"),
        ((*eval_, "--out", str(a_file / "sub")), f"cannot make directory {a_file / 'sub'}: {a_file} is not a directory"),
        (("eval", "--cache", str(a_file), "--out", str(tmp_path / "new")), f"{a_file} exists and is not a directory"),
        (("train", str(labels), "--validation", str(labels), "-o", str(a_file)), f"{a_file} exists and is not a directory"),
    ]:
        assert_one_line_error(cli(*args), fragment)
    assert (earlier / "report.md").read_text() == "an earlier run's report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "labels.jsonl", "report"]


def test_a_prompt_longer_than_the_model_was_trained_for_is_named_as_such():
    """Not as a --ctx the user never gave."""
    long = ("word " * 20000).encode()
    for args in (("run", "-"), ("run", "-", "--strategy", "best-of-n", "-n", "2")):
        proc = cli(*args, stdin=long)
        assert_one_line_error(proc, "more than the model's training context of 8192")
        assert "--ctx" not in proc.stderr.decode()


def test_chat_with_stdin_closed_says_so_before_loading_anything():
    proc = subprocess.run([sys.executable, "-m", "edge_adapt", "chat"], capture_output=True, timeout=300,
                          preexec_fn=lambda: os.close(0))
    assert_one_line_error(proc, "chat reads its turns from standard input, which is closed")
    assert proc.stdout == b""


def test_chat_switches_strategy_mid_conversation():
    proc = cli("chat", "--max-tokens", "12", stdin=b"What is 2 + 3?\n/strategy adaptive 4\nAnd 4 + 4?\n/exit\n")
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert "(strategy adaptive, budget 4; the engine holds 3 sequences)" in out and "error" not in out
    assert "p_keep" in out  # the second answer came from the strategy, with its score


def test_a_jobs_message_lines_reach_a_log_as_written(capsys):
    """Was: off a terminal rich wrapped them at 80 columns (and would read [markup] in them)."""
    from edge_adapt.cli import _show
    from edge_adapt.progress import Progress

    line = "epoch 1: " + "AUROC 0.5 " * 20 + "[bold]prune points [8, 16][/bold]"

    def job():
        yield Progress("train", 1, 1, message=line)
        return "done"

    assert _show(job()) == "done"
    assert capsys.readouterr().err == line + "\n"


# -- run: what it would ignore, what it reads from standard input, what it says ------------------------------------
def _stdin(monkeypatch: pytest.MonkeyPatch, data: bytes | None) -> None:
    """Standard input as a pipe holding `data` (None: closed, as `<&-` leaves it)."""
    monkeypatch.setattr(sys, "stdin", None if data is None else io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def _json(result: tuple[int, str, str]) -> dict:
    rc, out, err = result
    assert rc == 0, err
    return json.loads(out)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        # a flag the chosen strategy does not read is refused, as every strategy flag is without a strategy
        (("-s", "best-of-n", "--budget", "2", "--prune-at", "2", "--keep", "1", "--threshold", "0.9"),
         "error: --threshold, --keep, --prune-at are not used by strategy best-of-n"),
        (("-s", "single", "-n", "3"), "error: -n is not used by strategy single"),
        (("-s", "vote", "-n", "2", "--adapter", "none"), "error: --adapter is not used by strategy vote"),
        (("-s", "adaptive", "--temp", "0.3"), "error: --temp is not used by strategy adaptive"),  # its schedule's
        (("-s", "auto", "--beam-width", "2", "--top-k", "5"), "error: --beam-width, --top-k are not used by strategy auto"),
        (("-s", "prune", "--max-tokens", "40", "--lookahead", "2", "--sequential-ratio", "0.5", "--max-step-tokens", "4"),
         "error: --max-step-tokens, --lookahead, --sequential-ratio are not used by strategy prune"),
        # --raw leaves no chat template for --system, with a strategy too
        (("--raw", "--system", "be brief", "-s", "best-of-n", "-n", "2"), "--system needs the chat template"),
        # named as what they are
        (("-s", "adaptive", "--threshold", "nan"), "threshold: must be a number in [0, 1], got nan"),
        (("-s", "revise", "--sequential-ratio", "nan"), "sequential_ratio: must be a number in [0, 1], got nan"),
        (("-s", "prune", "--budget", "4", "--max-tokens", "24"), "the default prune point 32 is not below max_tokens (24)"),
        (("-m", ""), "'--model' / '-m': is empty"),
        (("-s", "best-of-n", "--adapter", ""), "'--adapter': is empty"),
        (("-s", ""), "unknown strategy ''"),
        (("-s", "", "--budget", "2"), "unknown strategy ''"),
    ],
)
def test_run_refuses_settings_it_would_ignore_and_names_mistakes_as_they_are(args: tuple[str, ...], fragment: str,
                                                                            capsys):
    one_error(inproc(capsys, "run", "hi", "--max-tokens", "4", *args), fragment)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        # a greedy sample (one without --temp, or --temp 0) draws nothing: no seed or filter changes a token
        (("--seed", "3"), "error: --seed has no effect on greedy decoding (one sample without --temp)"),
        (("--top-k", "1000", "--top-p", "0.5", "--min-p", "0.1"),
         "error: --top-k, --top-p, --min-p have no effect on greedy decoding"),
        (("-n", "2", "--temp", "0", "--seed", "3"), "error: --seed has no effect on greedy decoding (--temp 0)"),
        # the budget's range does not count the prompt's own sequence (nor lookahead's rollouts)
        (("-s", "best-of-n", "-n", "255"), "more than one llama.cpp context holds (255): its largest budget is 254"),
        (("-s", "lookahead", "--budget", "252"), "its largest budget is 124"),  # a multiple of its width, 4
        # a stop string no reply could match; a system message that would be dropped
        (("--stop", "a\udcffb"), "error: --stop is not valid UTF-8"),
        (("--system", ""), "error: --system is empty"),
        (("--system", "", "--raw"), "error: --system needs the chat template"),
    ],
)
def test_run_refuses_what_it_could_not_use_in_its_own_terms(args: tuple[str, ...], fragment: str, capsys):
    """Each was accepted and did nothing (or failed with a fix run cannot apply, `unify the KV`, exit 1)."""
    one_error(inproc(capsys, "run", "hi", "--max-tokens", "4", "--threads", "1", *args), fragment, code=2)


def test_the_options_strategies_read_are_options_some_strategy_reads():
    """What `unread` refuses: an option no strategy declares in `reads` is refused everywhere, and a name in
    `reads` that is no such option protects nothing."""
    from edge_adapt.strategies import STRATEGIES
    from edge_adapt.strategies.config import _SOME

    assert frozenset().union(*(spec.reads for spec in STRATEGIES.values())) == _SOME


def test_a_strategy_run_takes_raw_as_a_plain_run_does(capsys):
    plain = _json(inproc(capsys, "run", "The capital of France is", "--raw", "--max-tokens", "2", "--json"))
    strat = _json(inproc(capsys, "run", "The capital of France is", "--raw", "-s", "best-of-n", "-n", "2",
                         "--max-tokens", "2", "--json"))
    assert strat["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] == 5  # no chat template around it


def test_a_prompt_on_standard_input_loses_one_trailing_newline(capsys, monkeypatch):
    as_argument = _json(inproc(capsys, "run", "What is 2+2?", "--max-tokens", "1", "--json"))
    for data in (b"What is 2+2?\n", b"What is 2+2?\r\n"):
        _stdin(monkeypatch, data)
        piped = _json(inproc(capsys, "run", "-", "--max-tokens", "1", "--json"))
        assert piped["usage"]["prompt_tokens"] == as_argument["usage"]["prompt_tokens"], data


def test_standard_input_is_read_for_one_text_and_a_closed_one_is_one_error(capsys, monkeypatch):
    _stdin(monkeypatch, b"hello\n")
    one_error(inproc(capsys, "run", "-", "--system", "-", "--max-tokens", "2"), "cannot both be '-'")
    _stdin(monkeypatch, None)
    one_error(inproc(capsys, "run", "-", "--max-tokens", "2"), "the prompt is '-' (read standard input), but standard input is closed")
    one_error(inproc(capsys, "run", "hi", "--system", "-", "--max-tokens", "2"), "--system is '-'")


def test_several_samples_without_a_temperature_are_sampled(capsys):
    """-n 3 gave three copies of the greedy answer; one sample (and --temp 0) stays greedy."""
    sampled = _json(inproc(capsys, "run", "Name a color.", "-n", "3", "--max-tokens", "8", "--json"))
    assert len({s["text"] for s in sampled["samples"]}) > 1
    greedy = _json(inproc(capsys, "run", "Name a color.", "-n", "3", "--temp", "0", "--max-tokens", "8", "--json"))
    one = _json(inproc(capsys, "run", "Name a color.", "--max-tokens", "8", "--json"))
    assert {s["text"] for s in greedy["samples"]} == {one["samples"][0]["text"]}


def test_a_context_given_too_small_names_the_reply_budget_not_the_prompt(capsys):
    line = one_error(inproc(capsys, "run", "hi", "--ctx", "64"), "--max-tokens 256 (the default) need")
    assert "--ctx 64" in line and "shorten the prompt" not in line


def test_a_mistake_in_every_cell_of_a_policy_is_said_once(tmp_path: Path, capsys):
    from edge_adapt.engine.default_model import default_policy

    policy = json.loads(default_policy().read_text())
    for row in policy["budgets"].values():
        for cell in row:
            cell["strategy"] = "nosuch"
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    line = one_error(inproc(capsys, "run", "hi", "-s", "auto", "--budget", "4", "--policy", str(path)),
                     "unknown strategy 'nosuch'")
    cells = sum(len(row) for row in policy["budgets"].values())
    assert line.count("nosuch") == 1 and f" and {cells - 1} more: " in line, line


def test_info_refuses_a_budget_beyond_any_machine_and_plans_only_what_one_context_holds():
    """Was: a 400-digit --mem-budget ended in `unexpected OverflowError` (exit 70); 100GB planned 256 sequences,
    which the engine refuses; -n 300 within 100GB blamed the memory, and -n 300 alone was planned."""
    huge = cli("info", "--mem-budget", "1" + "0" * 400 + "GB")
    assert_one_line_error(huge, "is more than any machine has (at most 1048576GB)")
    assert huge.returncode == 2 and len(huge.stderr) < 200
    proc = cli("info", "--json", "--mem-budget", "100GB")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["plan"]["parallel"] == 255
    for args in (("-n", "300", "--mem-budget", "100GB"), ("-n", "300")):
        proc = cli("info", *args)
        assert_one_line_error(proc, "300 parallel sequences are more than one llama.cpp context holds: at most 255")
        assert b"MiB" not in proc.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_that_cannot_be_written_is_one_line(tmp_path: Path):
    """Was: `run > /dev/full` ended as `error: unexpected OSError ... (rerun with --debug)`, exit 70, a bug's
    wording for a full disk; with stdout closed (`>&-`) the answer went nowhere and the command exited 0."""
    cmd = [sys.executable, "-m", "edge_adapt", "run", "What is 2 + 2?", "--max-tokens", "4", "--threads", "1"]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == "error: cannot write to standard output: No space left on device"
    closed = subprocess.run(cmd, stderr=subprocess.PIPE, timeout=120, close_fds=True,
                            preexec_fn=lambda: os.close(1))
    assert_one_line_error(closed, "standard output is closed: run would write its output nowhere")
    assert closed.returncode == 2


def test_run_refuses_config_file_settings_its_strategy_does_not_read(tmp_path: Path):
    """Was: a file's keep, threshold and a policy that does not exist beside best-of-n were ignored and the run
    answered (rc 0), while `--keep` with best-of-n is refused; a file for beam run with `-s best-of-n` too."""
    cfg = tmp_path / "bon.toml"
    cfg.write_text('strategy = "best-of-n"\nbudget = 2\nkeep = 1\nthreshold = 0.9\npolicy = "none.json"\n')
    proc = cli("run", "hi", "--config", str(cfg), "--threads", "1")
    assert_one_line_error(proc, f"keep, threshold, policy in {cfg} are not used by strategy best-of-n")
    assert proc.returncode == 2
    cfg.write_text('strategy = "beam"\nbudget = 4\nbeam_width = 2\n')
    assert_one_line_error(cli("run", "hi", "--config", str(cfg), "-s", "best-of-n", "--threads", "1"),
                          f"beam_width in {cfg} is not used by strategy best-of-n")


def test_info_names_a_budget_in_units_a_person_reads(capsys):
    """Was: `plan within 1.024e+04 MiB` for --mem-budget 10GB."""
    rc, out, err = inproc(capsys, "info", "--mem-budget", "10GB")
    assert rc == 0, err
    assert "  plan within 10 GiB: " in out and "e+" not in out
