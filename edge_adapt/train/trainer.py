"""Train the self-eval adapter: PEFT on a transformers copy of the GGUF model, exported back to GGUF.

The loss reads the score exactly as the runtime does: the prompt and response are in the KV cache, the suffix
tokens are decoded after them, and p_keep = sigmoid(logit[no] - logit[yes]) at the last suffix position. It is
the binary cross-entropy of p_keep against the label's target t, i.e. the cross-entropy of the next token
restricted to the two answers, against {No: t, Yes: 1 - t}. The restriction is the runtime's own definition
of the score; a full-vocabulary softmax would also spend capacity on pushing mass onto the two tokens.

Why training is cheap enough for two CPU cores: with (a)LoRA the adapter acts only on the suffix tokens (the
runtime switches it on only while scoring), so the prompt and response are base-model computations. They run
once per prompt group without gradients (the prompt once, its K responses batched on top of it); every cut of a
response reuses the response's KV with the positions after the cut masked out; only the suffix tokens (4 for
the default suffix) run with gradients. Method `full` changes the weights under the prompt and response too,
so there gradients flow through the whole sequence.

Several processes (`accelerate launch`, `torchrun`) train data-parallel over prompts: each takes its share of every
step's prompts, the gradients are averaged by DDP, and the update is the one-process update (see `_train`).
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager, nullcontext
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any, Iterator

from edge_adapt.errors import ModelFileError, UsageError
from edge_adapt.fileio import check_output_dir, os_error_message
from edge_adapt.engine.vocab import same_model
from edge_adapt.eval import metrics
from edge_adapt.progress import Job, Progress, to_the_end
from edge_adapt.tasks.registry import family_named
from edge_adapt.train.config import TrainConfig
from edge_adapt.train.labels import LabelSet, merge_labels

CHUNK = 8  # responses batched over one prompt's KV; sorted by length so padding stays small

# transformers (pinned below 5.40, see pyproject.toml) warns at every forward that `past_key_values` and
# `is_gradient_checkpointing` are deprecated there: said once here, not in every training run's output. Later
# versions say it through their logger (once per process) instead of a FutureWarning.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
logging.getLogger("transformers.utils.generic").addFilter(
    lambda record: "`past_key_values`/`cache_params` are deprecated" not in record.getMessage())


@dataclass(frozen=True)
class Row:
    sample: int  # index of the response within its prompt group
    cut: int | None
    n_ids: int  # response tokens before the suffix
    target: float
    correct: bool


@dataclass(frozen=True)
class Group:
    """One prompt: its token ids, its distinct responses (full length) and the rows scored on them."""

    problem_id: str
    level: int | None
    prompt_ids: list[int]
    responses: list[list[int]]
    rows: list[Row]

    @property
    def family(self) -> str | None:
        return family_named(self.problem_id)


def row_target(row: dict[str, Any], target: str = "relative", relative_weight: float = 0.3) -> float:
    """What one label row is trained towards. relative: the label's own target (1 if right, else the share of the
    other samples not better); correct: 1 or 0; blend: (1 - w) * correct + w * relative, so a right reply stays
    at 1 and a wrong one gets w * (1 - the others' pass rate): below every right reply, and higher on a prompt
    that more samples would not fix than on one they would (the stop signal adaptive sampling needs)."""
    correct, relative = float(row["correct"]), float(row["target"])
    if target == "correct":
        return correct
    if target == "relative":
        return relative
    if target == "blend":
        return (1 - relative_weight) * correct + relative_weight * relative
    raise ValueError(f"unknown target {target!r}")


def groups_of(labels: LabelSet, target: str = "relative", relative_weight: float = 0.3) -> list[Group]:
    """Prompt groups, each row's target as `row_target` makes it."""
    out = []
    for rec in labels.prompts:
        full: dict[int, list[int]] = {r["sample"]: r["ids"] for r in rec["rows"] if r["cut"] is None}
        order = sorted(full)
        index = {s: i for i, s in enumerate(order)}
        rows = [Row(index[r["sample"]], r["cut"], len(r["ids"]), row_target(r, target, relative_weight),
                    bool(r["correct"]))
                for r in rec["rows"] if r["sample"] in index]
        out.append(Group(rec["problem_id"], rec.get("level"), rec["prompt_ids"], [full[s] for s in order], rows))
    return out


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    auroc: float | None
    brier: float
    brier_constant: float
    ece: float
    auroc_by_level: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0
    # Labels from several task families: each family's AUROC (levels then mean nothing across families).
    auroc_by_family: dict[str, float | None] = field(default_factory=dict)
    # Right above wrong among one prompt's whole replies only (what best-of-N chooses by); None: no mixed prompt.
    within_prompt_auroc: float | None = None

    def breakdown(self) -> str:
        """The per-family AUROCs when there are several families, else the per-level ones, for a progress line."""
        parts = self.auroc_by_family if len(self.auroc_by_family) > 1 else {f"L{k}": v for k, v in
                                                                             self.auroc_by_level.items()}
        return " ".join(f"{k} {_f(v)}" for k, v in parts.items())


@dataclass
class TrainResult:
    out: Path
    exported: Path
    best_epoch: int
    epochs: list[EpochResult]
    seconds: float
    peak_rss_mib: float
    examples: int
    processes: int = 1  # processes that trained together (data-parallel over prompts)
    main: bool = True  # this process wrote the outputs (the others of a multi-process run only computed)
    best_by: str = "AUROC"  # what chose the best epoch (see `better`)


def better(res: EpochResult, best: EpochResult | None) -> bool:
    """Whether epoch `res` validates better than `best`: by AUROC, or where validation holds replies of one class
    only (AUROC undefined every epoch) by the Brier score, lower being better; else the first epoch would be
    "best" with no measure behind it."""
    if best is None:
        return True
    if res.auroc is not None and best.auroc is not None:
        return res.auroc > best.auroc
    return res.brier < best.brier


def best_by(best: EpochResult) -> str:
    """The measure `better` chose `best` by."""
    return "AUROC" if best.auroc is not None else "Brier"


class _Scorer:
    """Forward passes shared by training and validation (torch is imported only here)."""

    def __init__(self, cfg: TrainConfig, hf_dir: Path, suffix_ids: list[int], yes: int, no: int,
                 checkpoint: Path | None = None, device: str = "cpu") -> None:
        """`checkpoint`: an (a)LoRA adapter directory to start from (trainable), or a `full` model directory."""
        import torch
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.cfg = cfg
        # `full` checkpoints are whole models; (a)LoRA checkpoints are adapters on the base.
        source = checkpoint if cfg.method == "full" and checkpoint is not None else hf_dir
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        model.config.use_cache = True
        if cfg.method == "full":
            self.model = model
            self.peft = None
        elif checkpoint is not None:
            self.peft = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
            self.model = self.peft
        else:
            lora = LoraConfig(
                r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), lora_dropout=0.0, bias="none",
                task_type="CAUSAL_LM", alora_invocation_tokens=list(suffix_ids) if cfg.method == "alora" else None,
            )
            self.peft = get_peft_model(model, lora)
            self.model = self.peft
        self.base = model  # LlamaForCausalLM (PEFT wraps its linear layers in place)
        self.net = self.model  # what trained forward passes run through: the DDP wrapper of several processes
        self.device = device
        self.model.to(device)
        self.suffix = torch.tensor(suffix_ids, dtype=torch.long, device=device)
        self.yes, self.no = yes, no
        if cfg.method != "full" and "lm_head" not in cfg.targets:
            # The score reads two logits: a head of those two rows (frozen, as the whole head is under (a)LoRA)
            # instead of the vocabulary's 49,152, whose product ran as a batched matmul over a broadcast weight
            # and took ~12% of a training step. Same weights, so the same logits.
            head = torch.nn.Linear(model.lm_head.in_features, 2, bias=False, device=device)
            head.weight = torch.nn.Parameter(model.lm_head.weight[[yes, no]].detach().clone(), requires_grad=False)
            model.lm_head = head
            self.yes, self.no = 0, 1

    def trainable(self) -> list[Any]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextmanager
    def _base_model(self, grad: bool) -> Iterator[None]:
        """The base model (adapter off: the prompt and the response are generation's, not the suffix's), with
        gradients or without."""
        ctx = self.torch.enable_grad() if grad else self.torch.no_grad()
        off = self.peft.disable_adapter() if self.peft is not None else nullcontext()
        with ctx, off:
            yield

    def _prompt(self, group: Group, grad: bool) -> Any:
        """The prompt's KV (base model), computed once per group and shared by its chunks of responses."""
        torch = self.torch
        from transformers import DynamicCache

        with self._base_model(grad):
            p = torch.tensor([group.prompt_ids], dtype=torch.long, device=self.device)
            return self.base.model(input_ids=p, use_cache=True, past_key_values=DynamicCache()).past_key_values

    def _prefix(self, group: Group, cache: Any, members: list[int], grad: bool) -> tuple[Any, Any]:
        """KV of prompt (`cache`, left as it is) + each member response (right-padded), and the attention mask
        over it."""
        torch = self.torch
        from transformers import DynamicCache

        with self._base_model(grad):
            lens = [len(group.responses[m]) for m in members]
            width = max(max(lens), 1)
            ids = torch.full((len(members), width), 0, dtype=torch.long)
            mask = torch.zeros((len(members), len(group.prompt_ids) + width), dtype=torch.long)
            mask[:, : len(group.prompt_ids)] = 1
            for i, m in enumerate(members):
                r = group.responses[m]
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, len(group.prompt_ids) : len(group.prompt_ids) + len(r)] = 1
            big = DynamicCache([(lay.keys.expand(len(members), -1, -1, -1).contiguous(),
                                 lay.values.expand(len(members), -1, -1, -1).contiguous()) for lay in cache.layers])
            out = self.base.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), past_key_values=big,
                                  use_cache=True)
        return out, ids

    def logit_diffs(self, group: Group, grad: bool) -> tuple[list[Row], Any, Any]:
        """(rows, logit[no] - logit[yes] per row, LM loss on the responses or None) for one prompt group."""
        torch = self.torch
        from transformers import DynamicCache

        n_p = len(group.prompt_ids)
        diffs, rows_out, lm_terms = [], [], []
        order = sorted(range(len(group.responses)), key=lambda m: len(group.responses[m]))
        full_grad = grad and self.cfg.method == "full"
        prompt = None
        for lo in range(0, len(order), CHUNK):
            members = order[lo : lo + CHUNK]
            where = {m: i for i, m in enumerate(members)}
            rows = [r for r in group.rows if r.sample in where]
            if not rows:
                continue
            prompt = prompt if prompt is not None else self._prompt(group, full_grad)
            out, ids = self._prefix(group, prompt, members, full_grad)
            # A reply of one token or none predicts nothing: a chunk of only those would average no terms (NaN).
            if full_grad and self.cfg.lm_loss > 0 and any(len(group.responses[m]) > 1 for m in members):
                lm_terms.append(self._lm_loss(out.last_hidden_state, ids, [len(group.responses[m]) for m in members]))
            pick = torch.tensor([where[r.sample] for r in rows], dtype=torch.long, device=self.device)
            cache = DynamicCache([(lay.keys.index_select(0, pick), lay.values.index_select(0, pick))
                                  for lay in out.past_key_values.layers])
            width = cache.get_seq_length()
            s = len(self.suffix)
            mask = torch.zeros((len(rows), width + s), dtype=torch.long)
            pos = torch.zeros((len(rows), s), dtype=torch.long)
            for i, r in enumerate(rows):
                mask[i, : n_p + r.n_ids] = 1
                pos[i] = torch.arange(n_p + r.n_ids, n_p + r.n_ids + s)
            mask[:, width:] = 1
            ctx = torch.enable_grad() if grad else torch.no_grad()
            net = self.net if grad else self.model
            with ctx:
                logits = net(input_ids=self.suffix.expand(len(rows), -1), attention_mask=mask.to(self.device),
                             position_ids=pos.to(self.device),
                             past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
                diffs.append(logits[:, self.no] - logits[:, self.yes])
            rows_out.extend(rows)
        lm = torch.stack(lm_terms).mean() if lm_terms else None
        return rows_out, torch.cat(diffs) if diffs else torch.zeros(0, device=self.device), lm

    def idle_loss(self) -> Any:
        """A zero loss over every trainable weight: a process with no prompt in a step still joins the step's
        gradient all-reduce (its share is zero)."""
        return self.net(input_ids=self.suffix[None], logits_to_keep=1).logits.sum() * 0.0

    def _lm_loss(self, hidden: Any, ids: Any, lens: list[int]) -> Any:
        torch = self.torch
        logits = self.base.lm_head(hidden[:, :-1])
        target = ids[:, 1:].clone()
        for i, n in enumerate(lens):
            target[i, max(n - 1, 0) :] = -100
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100)


def bce(diff: Any, target: Any) -> Any:
    """Binary cross-entropy of sigmoid(diff) against soft targets, stable for large |diff|."""
    import torch

    return torch.nn.functional.binary_cross_entropy_with_logits(diff, target, reduction="sum")


def rank_loss(rows: list[Row], diff: Any) -> Any | None:
    """Listwise loss within one prompt: at each cut (and for whole replies), the softmax over its replies' logit
    differences against the right replies' share, cross-entropy, averaged over the cuts whose replies are mixed.
    Best-of-N and pruning choose among one prompt's replies, so what they need is right above wrong *there*; the
    per-reply BCE also rewards telling easy prompts from hard ones, which chooses nothing. None: no mixed cut."""
    import torch

    terms = []
    for cut in {r.cut for r in rows}:
        at = [i for i, r in enumerate(rows) if r.cut == cut]
        right = torch.tensor([float(rows[i].correct) for i in at], device=diff.device)
        if 0 < right.sum() < len(at):
            terms.append(-(right / right.sum() * torch.log_softmax(diff[at], 0)).sum())
    return torch.stack(terms).mean() if terms else None


@dataclass
class _Validation:
    loss: float
    p_keep: list[float]
    rows: list[Row]
    levels: list[int | None]
    families: list[str | None]
    groups: list[int]  # which prompt group each row belongs to


def _validate(scorer: _Scorer, groups: list[Group], acc: Any) -> _Validation:
    """Each process scores its share of the groups (every N-th); the shares are gathered and put back in group
    order, so every process holds the whole validation, summed as one process sums it."""
    import torch
    from accelerate.utils import gather_object

    parts = []
    for i in range(acc.process_index, len(groups), acc.num_processes):
        g = groups[i]
        rows, diff, _ = scorer.logit_diffs(g, grad=False)
        loss = float(bce(diff, torch.tensor([r.target for r in rows], device=diff.device)))
        parts.append((i, loss, torch.sigmoid(diff).tolist(), rows, g.level, g.family))
    if acc.num_processes > 1:
        parts = sorted(gather_object(parts), key=lambda part: part[0])
    v = _Validation(0.0, [], [], [], [], [])
    for i, loss, p_keep, rows, level, family in parts:
        v.groups.extend([i] * len(rows))
        v.loss += loss
        v.p_keep.extend(p_keep)
        v.rows.extend(rows)
        v.levels.extend([level] * len(rows))
        v.families.extend([family] * len(rows))
    v.loss /= max(len(v.rows), 1)
    return v


def _epoch_metrics(epoch: int, train_loss: float, v: _Validation, seconds: float) -> EpochResult:
    """Calibration judged as the evaluation report judges it: whole responses, against correctness."""
    full = [(p, r, lv, fam) for p, r, lv, fam in zip(v.p_keep, v.rows, v.levels, v.families) if r.cut is None]
    scores, right = [p for p, *_ in full], [r.correct for _, r, *_ in full]
    by_prompt: dict[int, tuple[list[float], list[bool]]] = {}
    for p, r, g in zip(v.p_keep, v.rows, v.groups):
        if r.cut is None:
            by_prompt.setdefault(g, ([], []))[0].append(p)
            by_prompt[g][1].append(r.correct)

    def auroc_where(keep: Any) -> float | None:
        return metrics.auroc([p for p, r, lv, fam in full if keep(lv, fam)],
                             [r.correct for p, r, lv, fam in full if keep(lv, fam)])

    levels = sorted({lv for _, _, lv, _ in full if lv is not None})
    families = sorted({fam for *_, fam in full if fam is not None})
    return EpochResult(
        epoch=epoch, train_loss=train_loss, val_loss=v.loss, auroc=metrics.auroc(scores, right),
        within_prompt_auroc=metrics.within_prompt_auroc(list(by_prompt.values())),
        brier=metrics.brier(scores, right), brier_constant=metrics.brier_constant(right),
        ece=metrics.ece(scores, right), seconds=seconds,
        auroc_by_level={str(x): auroc_where(lambda lv, _, x=x: lv == x) for x in levels},
        auroc_by_family={x: auroc_where(lambda _, fam, x=x: fam == x) for x in families},
    )


def require_train_extra() -> None:
    """A one-line error, before any work, when the [train] extra is not installed."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"training needs the [train] extra: pip install 'edge-adapt[train]' ({exc.name} is missing)") from None


def train_job(cfg: TrainConfig) -> Job[TrainResult]:
    """Import the base model, train, keep the best epoch by validation AUROC (Brier where it is undefined), export
    to GGUF. As a job it yields Progress ("train" per optimizer step; "validate" per validation, its metrics as
    the message); `train` runs it to its result.

    Inputs are checked before any work; if the run fails or is interrupted, what it created in the output
    directory (the directory itself, if it made it) is removed.

    Launched as several processes, only the main one writes (and yields Progress); each returns the result."""
    from edge_adapt.fileio import removed_on_failure

    acc = _accelerator()
    with removed_on_failure(cfg.out) if acc.is_main_process else nullcontext():
        return (yield from _train(cfg, acc))


def _accelerator() -> Any:
    """accelerate picks the device: CUDA under `accelerate launch` on a GPU machine, else the CPU. Launched as
    several processes on a machine without an accelerator, accelerate would run each as a run of its own (and
    all would write the outputs); they are CPU processes of one gloo group instead."""
    import os

    import torch
    from accelerate import Accelerator

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=several and not torch.accelerator.is_available())


def _train(cfg: TrainConfig, acc: Any) -> Job[TrainResult]:
    """One process or several. Several share every step's prompts (process i of N takes prompts i, i + N, ...
    of the step's batch); each weighs its rows by the whole step's row count and scales its loss by N, so
    DDP's average of the gradients is the one-process gradient. What remains different is the order of float
    sums (each process's share, then the all-reduce); a step with fewer prompts than processes leaves some
    processes idle (they join the all-reduce with zero gradients). Validation is shared the same way and
    gathered. Every process seeds alike (and DDP starts them from the main process's weights); only the main
    one imports the base model, saves checkpoints, exports and writes metrics."""
    import torch

    from edge_adapt.convert import convert_adapter, convert_model, import_adapter, import_gguf
    from edge_adapt.engine import Engine
    from edge_adapt.engine.budget import peak_rss
    from edge_adapt.selfeval.config import SelfEvalConfig
    from edge_adapt.selfeval.suffix import answer_token, render_suffix

    t_start = time.perf_counter()
    if not sys.stderr.isatty():
        # transformers draws its own bars (loading weights) on stderr; edge-adapt's stay silent off a terminal, where
        # a bar is only noise in a log, and so do these.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out = Path(cfg.out)
    check_output_dir(out, force=cfg.force)
    _check_inputs_outside_replaced(cfg, out)
    train_set, val_set = merge_labels(cfg.labels), merge_labels(cfg.validation)
    trained_on, validated_on = str(train_set.header.get("model")), str(val_set.header.get("model"))
    if not same_model(trained_on, validated_on):
        raise UsageError(f"training and validation labels come from different models ({trained_on}, {validated_on})")
    overlap = {p["problem_id"] for p in train_set.prompts} & {p["problem_id"] for p in val_set.prompts}
    if overlap:
        raise UsageError(f"validation shares {len(overlap)} prompts with training (e.g. {sorted(overlap)[0]})")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    self_eval = SelfEvalConfig(format="raw", suffix=cfg.suffix, yes=cfg.yes, no=cfg.no)
    with Engine(model=cfg.model, parallel=1, ctx=256) as eng:
        if not same_model(str(train_set.header.get("model")), eng.fingerprint):
            raise UsageError(f"labels were made with {train_set.header.get('model')}, the model is {eng.fingerprint}")
        top = max(max(rec["prompt_ids"] + [t for r in rec["rows"] for t in r["ids"]])  # a reply may have none
                  for rec in train_set.prompts + val_set.prompts)
        if top >= eng.model.n_vocab:
            raise UsageError(f"labels hold token id {top}, outside the model's {eng.model.n_vocab} tokens")
        suffix_ids = render_suffix(self_eval, eng)
        yes, no = answer_token(eng, cfg.yes, "yes"), answer_token(eng, cfg.no, "no")
        base_gguf, base_name = eng.model_path, eng.info.name
    main, world, rank = acc.is_main_process, acc.num_processes, acc.process_index
    acc.wait_for_everyone()  # every process has checked the output directory before the main one writes there
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelFileError(os_error_message(out, exc)) from None
    init = cfg.init
    if init is not None and Path(init).is_file() and cfg.method != "full":
        # An exported adapter (the shipped one, say): back to PEFT, so training continues where it left off.
        init = import_adapter(init, base_gguf, out / "init", force=True).path if main else out / "init"
        acc.wait_for_everyone()  # the others check what the main process imported
    if init is not None:
        if _check_init(cfg, init, suffix_ids) < cfg.rank:
            # More capacity, same start: the grown adapter scores exactly as the one it came from.
            if main:
                grow_rank(init, cfg.rank, out / "init-grown", seed=cfg.seed)
            acc.wait_for_everyone()
            init = out / "init-grown"
    hf_dir = out / "base-hf"  # kept between runs into one directory: it is the base model, imported once
    source = _source_of(base_gguf)
    if main and not ((hf_dir / "config.json").exists() and _read(hf_dir / SOURCE_FILE) == source):
        import_gguf(base_gguf, hf_dir, force=True)
        (hf_dir / SOURCE_FILE).write_text(source)
    acc.wait_for_everyone()  # the others load what the main process imported

    scorer = _Scorer(cfg, hf_dir, suffix_ids, yes, no, checkpoint=init, device=str(acc.device))
    opt = torch.optim.AdamW(scorer.trainable(), lr=cfg.learning_rate, weight_decay=0.0)
    # Several processes: DDP over the trained model (the forward passes with gradients run through it); the
    # base-model prefix passes run on the inner modules without gradients, as in one process.
    scorer.net, opt = acc.prepare(scorer.model, opt)
    if scorer.net is not scorer.model:
        # No buffer broadcast per forward pass: processes whose prompts take different numbers of passes would
        # deadlock on it, and the only buffers (rotary frequencies) are computed alike everywhere.
        scorer.net.broadcast_buffers = False
    train_groups, val_groups = (groups_of(s, cfg.target, cfg.relative_weight) for s in (train_set, val_set))
    steps_per_epoch = math.ceil(len(train_groups) / cfg.prompts_per_step)
    total_steps = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    warmup = max(1, total_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))) + 1e-3)

    history: list[EpochResult] = []
    best: EpochResult | None = None
    # The run's outputs are written under `stage` and moved in together at the end: an earlier run's (--force)
    # stay whole until then, and a run that fails or is interrupted leaves them as they were.
    stage = out / ".new"
    best_dir = stage / "checkpoint"
    if main:
        shutil.rmtree(stage, ignore_errors=True)  # a killed run's (kill -9 leaves what Ctrl-C would take back)
        stage.mkdir()
    step = 0
    rng = random.Random(cfg.seed)
    if cfg.validate_before:
        val0 = _epoch_metrics(0, float("nan"), _validate(scorer, val_groups, acc), 0.0)
        history.append(val0)
        if cfg.init is not None:  # a continued run exports its starting adapter if no epoch validates better
            best = val0
            if main:
                _save(scorer, best_dir)
    if cfg.validate_before and main:
        yield Progress("validate", 0, cfg.epochs,
                       message=f"before training: AUROC {_f(val0.auroc)} ({val0.breakdown()}) within prompts "
                               f"{_f(val0.within_prompt_auroc)} Brier {val0.brier:.3f}")
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        order = train_groups[:]
        rng.shuffle(order)
        losses: list[float] = []
        for lo in range(0, len(order), cfg.prompts_per_step):
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            batch = order[lo : lo + cfg.prompts_per_step]
            n_rows = sum(len(g.rows) for g in batch)
            mine = batch[rank::world]
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for i, g in enumerate(mine):
                # Gradients add up locally; the step's last backward pass averages them over the processes.
                with acc.no_sync(scorer.net) if i < len(mine) - 1 else nullcontext():
                    rows, diff, lm = scorer.logit_diffs(g, grad=True)
                    t = torch.tensor([r.target for r in rows], device=diff.device)
                    loss = bce(diff, t) / n_rows
                    ranked = rank_loss(rows, diff) if cfg.rank_weight > 0 else None
                    if ranked is not None:
                        loss = loss + cfg.rank_weight * ranked / len(batch)
                    if lm is not None:
                        loss = loss + cfg.lm_loss * lm / len(batch)
                    acc.backward(loss * world)  # DDP divides the sum over processes by their number
                step_loss += float(loss.detach())
            if not mine:
                acc.backward(scorer.idle_loss())
            torch.nn.utils.clip_grad_norm_(scorer.trainable(), 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(_summed(acc, step_loss))  # the same sum in every process: all stop together
            if not math.isfinite(losses[-1]):
                raise UsageError(f"training diverged: the loss is {losses[-1]} at step {step} (lower --lr or "
                                 "--rank-weight)")
            if main:
                yield Progress("train", step, total_steps,
                               f"epoch {epoch} loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")
        res = _epoch_metrics(epoch, sum(losses) / max(len(losses), 1), _validate(scorer, val_groups, acc),
                             time.perf_counter() - t0)
        history.append(res)
        if main:
            yield Progress("validate", epoch, cfg.epochs,
                           message=f"epoch {epoch}: AUROC {_f(res.auroc)} ({res.breakdown()}) within prompts "
                                   f"{_f(res.within_prompt_auroc)} Brier {res.brier:.3f} "
                                   f"(constant {res.brier_constant:.3f}) ECE {res.ece:.3f}")
        if better(res, best):
            best = res  # every process holds the whole validation, so all agree on the best epoch
            if main:
                _save(scorer, best_dir)
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
    assert best is not None

    meta = self_eval.model_dump(include={"format", "suffix", "yes", "no"})
    name = "model.gguf" if cfg.method == "full" else "adapter.gguf"
    acc.wait_for_everyone()  # training is over everywhere before the main process exports
    if main:
        if cfg.method == "full":
            convert_model(best_dir, stage / name, type=cfg.export_type, self_eval_config=meta, force=True,
                          name=f"{base_name} self-eval fine-tune")
        else:
            convert_adapter(best_dir, base_gguf, stage / name, self_eval_config=meta, type="f16", force=True,
                            name=f"{base_name} self-eval adapter")
    result = TrainResult(out, out / name, best.epoch, history, time.perf_counter() - t_start, peak_rss() / 2**20,
                         train_set.n_rows, world, main, best_by(best))
    if main:
        _write_metrics(cfg, result, suffix_ids, stage)
        _move_in(stage, out, stale=[out / ("adapter.gguf" if name == "model.gguf" else "model.gguf")])
    acc.wait_for_everyone()  # every process returns once the outputs are there
    return result


train = to_the_end(train_job)


def _check_inputs_outside_replaced(cfg: TrainConfig, out: Path) -> None:
    """Refuse, before any work, an input inside a folder of `out` that a run replaces or removes as a whole (the
    imported base model, the imported or grown --init, the staging folder, the best checkpoint): it would be
    deleted with it. An --init in `checkpoint/` or `init-grown/` is the exception: an earlier run's adapter, which
    this run continues from (it is read first) and, by design, replaces."""
    from edge_adapt.fileio import check_replaceable

    data = [*cfg.labels, *cfg.validation, *([cfg.model] if cfg.model is not None else [])]
    init = [cfg.init] if cfg.init is not None else []
    imported = init if cfg.init is not None and Path(cfg.init).is_file() else []  # only a file is imported to init/
    for sub, inputs in (("base-hf", data + init), (".new", data + init), ("init", data + imported),
                        ("init-grown", data), ("checkpoint", data)):
        check_replaceable(out / sub, inputs=inputs)


def _summed(acc: Any, x: float) -> float:
    """x summed over the processes (x itself in one process)."""
    if acc.num_processes == 1:
        return x
    import torch

    return float(acc.reduce(torch.tensor([x], dtype=torch.float64, device=acc.device), "sum")[0])


def _check_init(cfg: TrainConfig, init: Path, suffix_ids: list[int]) -> int:
    """A checkpoint to continue from must be an adapter of this method and suffix, and of this rank or a lower one
    to grow (else PEFT loads it silently into a different shape of training than the one asked for). Its rank."""
    if cfg.method == "full":
        raise UsageError("--init continues an (a)LoRA adapter; method full starts from the base model")
    from edge_adapt.fileio import read_user_file

    try:
        peft_cfg = json.loads(read_user_file(Path(init) / "adapter_config.json", max_bytes=1 << 20, text=True))
    except (UsageError, json.JSONDecodeError) as exc:
        raise UsageError(f"--init {cfg.init}: not a PEFT adapter checkpoint ({exc})") from None
    if not isinstance(peft_cfg, dict):
        raise UsageError(f"--init {cfg.init}: not a PEFT adapter checkpoint (adapter_config.json is not an object)")
    invocation = peft_cfg.get("alora_invocation_tokens")
    method = "alora" if invocation else "lora"
    r = peft_cfg.get("r")
    if method != cfg.method:
        raise UsageError(f"--init {cfg.init} is {'an' if method == 'alora' else 'a'} {method} adapter; this run trains "
                         f"with --method {cfg.method} (pass --method {method} to continue it)")
    if not isinstance(r, int) or r > cfg.rank:
        raise UsageError(f"--init {cfg.init} is a rank-{r} {method} adapter; this run trains a "
                         f"rank-{cfg.rank} {cfg.method} one (a rank can grow, not shrink)")
    if invocation and list(invocation) != list(suffix_ids):
        raise UsageError(f"--init {cfg.init} was trained on another self-eval suffix (tokens {invocation}, "
                         f"this run's are {suffix_ids})")
    return r


def grow_rank(checkpoint: Path, rank: int, dest: Path, seed: int = 0) -> Path:
    """A PEFT (a)LoRA checkpoint widened to `rank`, scoring exactly as before: each A gains fresh rows (PEFT's own
    initialisation), each B zero columns, and lora_alpha grows with the rank so that the scale alpha / r, and with
    it every B @ A, is unchanged. Training then has the extra directions to use (a capacity experiment that keeps
    what the smaller adapter learned instead of starting from scratch)."""
    import torch
    from safetensors.torch import load_file, save_file

    from edge_adapt.fileio import atomic_dir

    src = Path(checkpoint)
    peft_cfg = json.loads((src / "adapter_config.json").read_text())
    old = int(peft_cfg["r"])
    if rank < old:
        raise UsageError(f"{src}: a rank-{old} adapter cannot shrink to rank {rank}")
    weights = load_file(src / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    grown: dict[str, Any] = {}
    for name, w in weights.items():
        if ".lora_A." in name:  # (r, in): new rows as PEFT initialises A
            extra = torch.nn.init.kaiming_uniform_(torch.empty(rank - old, w.shape[1], dtype=w.dtype),
                                                   a=math.sqrt(5), generator=gen)
            grown[name] = torch.cat([w, extra], dim=0).contiguous()
        elif ".lora_B." in name:  # (out, r): zero columns, so the new directions start switched off
            grown[name] = torch.cat([w, torch.zeros(w.shape[0], rank - old, dtype=w.dtype)], dim=1).contiguous()
        else:
            grown[name] = w
    peft_cfg.update(r=rank, lora_alpha=float(peft_cfg["lora_alpha"]) * rank / old)
    with atomic_dir(dest, force=True) as tmp:
        save_file(grown, Path(tmp) / "adapter_model.safetensors")
        (Path(tmp) / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2))
    return Path(dest)


def _save(scorer: _Scorer, path: Path) -> None:
    """The PEFT adapter (or the whole model for `full`) with what the converter needs beside it."""
    from edge_adapt.fileio import atomic_dir

    from safetensors import SafetensorError

    with atomic_dir(path, force=True) as tmp:
        try:
            scorer.model.save_pretrained(tmp)
        except SafetensorError as exc:  # safetensors' own error for a failed write (a full disk)
            raise ModelFileError(f"cannot write {path}: {exc}") from None
        if scorer.peft is None:
            src = Path(scorer.base.name_or_path)
            for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
                if (src / f).exists():
                    shutil.copy(src / f, Path(tmp) / f)


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _no_nan(x: Any) -> Any:
    """`x` with NaN and infinities as null: strict JSON (epoch 0 has no training loss), which every reader takes."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def _write_metrics(cfg: TrainConfig, result: TrainResult, suffix_ids: list[int], into: Path) -> None:
    from dataclasses import asdict

    from edge_adapt.fileio import atomic_file

    data = {
        "config": json.loads(cfg.model_dump_json()), "suffix_ids": suffix_ids, "exported": str(result.exported),
        "best_epoch": result.best_epoch, "best_by": result.best_by, "seconds": round(result.seconds, 1), "peak_rss_mib": round(result.peak_rss_mib),
        "processes": result.processes, "train_rows": result.examples, "epochs": [asdict(e) for e in result.epochs],
    }
    with atomic_file(into / "metrics.json", force=True) as tmp:
        tmp.write_text(json.dumps(_no_nan(data), indent=2, allow_nan=False) + "\n")
    _plot(result, into / "training.png")


SOURCE_FILE = "edge_adapt_source.txt"


def _source_of(gguf: Path) -> str:
    """Which base model file an imported copy came from (path, size, modification time): another --model, or
    the file changed, and the copy is imported again."""
    st = Path(gguf).stat()
    return f"{Path(gguf).resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _move_in(stage: Path, out: Path, stale: Seq[Path] = ()) -> None:
    """Put every entry of `stage` in place of its namesake in `out` (renames), remove what an earlier run left that
    this one replaces under another name (`stale`: the other method's export), then remove `stage`. Ctrl-C waits
    for the renames (interrupts.held): a run half moved in would name an adapter it does not hold."""
    from edge_adapt import interrupts
    from edge_adapt.fileio import replace_path

    with interrupts.held():
        for entry in sorted(stage.iterdir()):
            replace_path(entry, out / entry.name)
        for path in stale:
            path.unlink(missing_ok=True)
    shutil.rmtree(stage, ignore_errors=True)


def _plot(result: TrainResult, path: Path) -> None:
    from edge_adapt.eval.plots import pyplot

    plt = pyplot()
    if plt is None:
        return
    ep = [e.epoch for e in result.epochs]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(ep[1:], [e.train_loss for e in result.epochs[1:]], "o-", label="train")
    ax[0].plot(ep, [e.val_loss for e in result.epochs], "o-", label="validation")
    ax[0].set(xlabel="epoch", ylabel="BCE vs target", title="loss")
    ax[0].legend()
    ax[1].plot(ep, [e.auroc or float("nan") for e in result.epochs], "o-", label="AUROC")
    ax[1].plot(ep, [e.brier for e in result.epochs], "o-", label="Brier")
    ax[1].plot(ep, [e.brier_constant for e in result.epochs], "--", label="Brier, constant")
    ax[1].set(xlabel="epoch", title="validation (whole responses vs correctness)")
    ax[1].legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise ModelFileError(os_error_message(path, exc)) from None
    finally:
        plt.close(fig)
