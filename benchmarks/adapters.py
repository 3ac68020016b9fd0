"""Sparse PEFT benchmark: row-delta adapters against LoRA and full fine-tuning, on equal token budgets.

Tasks (GSM8K train, plain format, batch 4, the same token budget for every arm):
- `A`: supervised fine-tuning of the dense model (task CE);
- `B`: recovery of the default 50% SparseGPT model of the dense GSM8K model, distilled from that
  dense model (CE 1 + KL 3 + square-head 10, as `recovery.py`). The dense GSM8K model is trained
  once (full fine-tuning, `--teacher-lr`) and kept in the work folder.

Every arm recomputes activations in the backward pass (`--gradient-checkpointing`, on by default):
the activations of a backward through the frozen base would otherwise dominate every arm's memory
alike. Arms: `full` (the existing loop), `lora`, `rows-l2`, `rows-taylor`, `rows-zo-taylor`, and on a 4-bit
base `qlora`, `rows-4bit` (l2 rows) and `rows-4bit-taylor`, both with residual init. Rows use `--rows`
rows per linear; LoRA's rank is the one whose trainable parameters come closest. Every arm runs in its
own process, so its peak RSS is its own. Each is evaluated on GSM8K test answer perplexity (200 rows)
and WikiText-2 (8 x 2048). Before the arms, the Spearman rank correlation of the `zo-taylor` and
`l1` row scores with first-order `taylor` is measured on task B's starting model. Arms merge into
one JSON across invocations (same settings). Run it alone:

    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/adapters.py --tasks B

(Not `peft.py`: a script of that name would shadow the `peft` library it measures.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("full", "lora", "rows-l2", "rows-taylor", "rows-zo-taylor", "qlora", "rows-4bit", "rows-4bit-taylor")


def arm_options(arm: str, rows: int, lora_rank: int) -> dict:
    rows_ = {"peft": "rows", "adapter": {"rank": rows}}
    return {
        "full": {},
        "lora": {"peft": "lora", "adapter": {"rank": lora_rank}},
        "rows-l2": {**rows_, "adapter": {"rank": rows, "criterion": "l2"}},
        "rows-taylor": {**rows_, "adapter": {"rank": rows, "criterion": "taylor"}},
        "rows-zo-taylor": {**rows_, "adapter": {"rank": rows, "criterion": "zo-taylor"}},
        "qlora": {"peft": "lora", "adapter": {"rank": lora_rank, "base_bits": 4}},
        "rows-4bit": {**rows_, "adapter": {"rank": rows, "criterion": "l2", "base_bits": 4}},
        "rows-4bit-taylor": {**rows_, "adapter": {"rank": rows, "criterion": "taylor", "base_bits": 4}},
    }[arm]


def lora_rank_matching(model, rows: int) -> int:  # noqa: ANN001
    """The LoRA rank whose parameters, r (in + out) per linear, come closest to rows x in per linear."""
    from sparsefit.models.layout import weight_as_out_in
    from sparsefit.training.masks import decoder_linears

    shapes = [weight_as_out_in(m).shape for m in decoder_linears(model).values()]
    per_rank = sum(o + i for o, i in shapes)
    return max(1, round(rows * sum(i for _, i in shapes) / per_rank))


def evaluate(model, tokenizer, args) -> dict:  # noqa: ANN001
    from sparsefit.evaluation.gsm8k import evaluate_answer_ppl
    from sparsefit.evaluation.tasks import evaluate_perplexity

    model.eval()
    ans = evaluate_answer_ppl(model, tokenizer, limit=args.answer_rows, progress=False)
    wiki = evaluate_perplexity(
        model, tokenizer, "wikitext2", seq_len=2048, max_windows=args.wiki_windows, progress=False
    )
    return {"gsm8k_answer_ppl": ans["ppl"], "wikitext2_ppl": wiki["ppl"]}


def base_config(args, task: str) -> dict:  # noqa: ANN001
    base = dict(
        dataset="gsm8k", format="plain", max_tokens=args.tokens, batch_size=args.batch_size, checkpoint_every=0,
        checkpoint_minutes=0, gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    if task == "B":
        base.update(teacher=str(Path(args.work) / "teacher"), ce_weight=1.0, kl_weight=3.0, square_head_weight=10.0)
    return base


def run_arm(args) -> None:  # noqa: ANN001
    """One arm in this process; prints its result as the last line."""
    from sparsefit.models import load_model_and_tokenizer
    from sparsefit.models.offload import reuse_freed_memory
    from sparsefit.training import FinetuneConfig, finetune

    reuse_freed_memory()  # as the CLI's training commands do
    work = Path(args.work)
    start = args.model if args.task == "A" else str(work / "oneshot-b")
    model, tok = load_model_and_tokenizer(start, "float32", "cpu")
    options = arm_options(args.arm, args.rows, args.lora_rank)
    lr = args.lr if args.arm == "full" else args.adapter_lr
    config = FinetuneConfig(**base_config(args, args.task), lr=lr, **options)
    out = work / f"{args.task}-{args.arm}"
    m = finetune(model, tok, config, out, overwrite=True, progress=False)
    keep = ("steps", "tokens", "train_seconds", "tokens_per_second", "final_loss", "bf16", "peak_rss_mb")
    loop = {k: m[k] for k in keep}
    loop["sparsity"], loop["revived_weights"] = m["sparsity"], m["revived_weights"]
    loop["lr"] = lr
    loop["trainable_parameters"] = (
        m["adapters"]["trainable_parameters"] if "adapters" in m else sum(p.numel() for p in model.parameters())
    )
    result = {**evaluate(model, tok, args), "loop": loop, "adapters": m.get("adapters")}
    if result["adapters"]:
        result["adapters"].pop("rows_per_layer", None)
    print(json.dumps(result))


def spearman(a, b) -> float:  # noqa: ANN001
    import torch

    ra, rb = (torch.argsort(torch.argsort(x.double())).double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def correlations(model, tok, args) -> dict:  # noqa: ANN001
    """Spearman correlation of zo-taylor and l1 row scores with first-order taylor (per layer, then the mean)."""
    import statistics

    import torch

    from sparsefit.training import FinetuneConfig
    from sparsefit.training.adapters.select import row_scores
    from sparsefit.training.data import collate, load_examples
    from sparsefit.training.masks import decoder_linears

    cfg = FinetuneConfig(dataset="gsm8k", format="plain")
    examples = load_examples(tok, "gsm8k", "train", "plain", cfg.seq_len, "text", "prompt", "completion", None)
    batches = [collate(examples[i : i + 4], tok.pad_token_id or 0) for i in range(0, 4 * args.zo_directions, 4)]
    model.eval()

    def loss_fn(batch):  # noqa: ANN001, ANN202
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**batch, use_cache=False).loss

    linears = decoder_linears(model)
    t = time.perf_counter()
    taylor = row_scores(linears, "taylor", loss_fn, batches[: args.taylor_batches])
    taylor_s = time.perf_counter() - t
    t = time.perf_counter()
    zo = row_scores(linears, "zo-taylor", loss_fn, batches, directions=args.zo_directions)
    zo_s = time.perf_counter() - t
    l1 = row_scores(linears, "l1")
    per = {name: (spearman(zo[name], taylor[name]), spearman(l1[name], taylor[name])) for name in linears}
    return {
        "taylor_batches": args.taylor_batches,
        "zo_directions": args.zo_directions,
        "spearman_zo_taylor_vs_taylor": statistics.fmean(v[0] for v in per.values()),
        "spearman_l1_vs_taylor": statistics.fmean(v[1] for v in per.values()),
        "taylor_seconds": taylor_s,
        "zo_taylor_seconds": zo_s,
    }


def prepare(args, result: dict) -> None:  # noqa: ANN001
    """Task B's teacher (dense GSM8K fine-tune) and start (its 50% SparseGPT model), once per work folder."""
    from sparsefit.export import save_checkpoint
    from sparsefit.models import load_model_and_tokenizer
    from sparsefit.pruning import OneShotConfig, oneshot
    from sparsefit.training import FinetuneConfig, finetune

    work = Path(args.work)
    starts = result.setdefault("starts", {})
    if "A" in args.tasks and "A-dense" not in starts:
        model, tok = load_model_and_tokenizer(args.model, "float32", "cpu")
        starts["A-dense"] = evaluate(model, tok, args)
    if "B" not in args.tasks:
        return
    if not (work / "teacher" / "config.json").is_file():
        model, tok = load_model_and_tokenizer(args.model, "float32", "cpu")
        cfg = FinetuneConfig(**{**base_config(args, "A"), "gradient_checkpointing": False}, lr=args.teacher_lr)
        finetune(model, tok, cfg, work / "teacher", overwrite=True, progress=False)
    if "B-teacher" not in starts:
        model, tok = load_model_and_tokenizer(str(work / "teacher"), "float32", "cpu")
        starts["B-teacher"] = evaluate(model, tok, args)
    if not (work / "oneshot-b" / "config.json").is_file():
        model, tok = load_model_and_tokenizer(str(work / "teacher"), "float32", "cpu")
        oneshot(model, tok, OneShotConfig(method="sparsegpt", sparsity=0.5), progress=False)
        save_checkpoint(model, tok, work / "oneshot-b")
    model, tok = load_model_and_tokenizer(str(work / "oneshot-b"), "float32", "cpu")
    if "B-oneshot" not in starts:
        starts["B-oneshot"] = evaluate(model, tok, args)
    if "criteria_correlation" not in result and args.zo_directions:
        result["criteria_correlation"] = correlations(model, tok, args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="B", help="A, B or A,B")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--tokens", type=int, default=150_000, help="token budget of each fine-tune")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4, help="full fine-tuning (as recovery.py's sparse stage)")
    p.add_argument("--adapter-lr", type=float, default=1e-3, help="LoRA and row adapters")
    p.add_argument("--teacher-lr", type=float, default=1e-4, help="task B's dense GSM8K fine-tune")
    p.add_argument("--rows", type=int, default=32, help="rows per linear of the row adapters")
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="every arm (default on): activations would otherwise dominate every arm's memory alike",
    )
    p.add_argument("--taylor-batches", type=int, default=8, help="criteria correlation: taylor's batches")
    p.add_argument("--zo-directions", type=int, default=16, help="criteria correlation: zo-taylor's directions")
    p.add_argument("--wiki-windows", type=int, default=8)
    p.add_argument("--answer-rows", type=int, default=200)
    p.add_argument("--work", default="runs/bench-adapters")
    p.add_argument("--out", default="benchmarks/results/adapters.json")
    p.add_argument("--run-arm", nargs=2, metavar=("TASK", "ARM"), help=argparse.SUPPRESS)
    p.add_argument("--lora-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--prepare", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.tasks = args.tasks.split(",")
    if args.run_arm:
        args.task, args.arm = args.run_arm
        run_arm(args)
        return
    if args.prepare:  # in a child process too: an arm's peak RSS must not inherit a parent's models
        state = json.loads(Path(args.prepare).read_text())
        from sparsefit.models import load_model_and_tokenizer

        dense, _ = load_model_and_tokenizer(args.model, "float32", "cpu")
        state["lora_rank"] = lora_rank_matching(dense, args.rows)
        del dense
        prepare(args, state)
        Path(args.prepare).write_text(json.dumps(state))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from environment import environment
    from sparsefit.atomic import write_json

    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS)) + sorted(set(args.tasks) - {"A", "B"})
    if unknown:
        raise SystemExit(f"unknown arms or tasks: {', '.join(unknown)}")
    settings = (
        "model",
        "tokens",
        "batch_size",
        "lr",
        "adapter_lr",
        "teacher_lr",
        "rows",
        "answer_rows",
        "wiki_windows",
        "gradient_checkpointing",
    )
    passed = ("model", "tokens", "batch_size", "lr", "adapter_lr", "teacher_lr", "rows", "answer_rows", "wiki_windows",
              "work", "taylor_batches", "zo_directions")  # fmt: skip
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in passed]
    flags += [f"--tasks={','.join(args.tasks)}"]
    flags.append("--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing")
    # Every arm runs in a child of this light process: on Linux a child's peak RSS starts at its parent's.
    result: dict = {"args": {k: getattr(args, k) for k in settings}, "environment": environment()}
    result["runs"] = {}
    if Path(args.out).is_file():  # arms of an earlier run with the same settings merge into this one
        earlier = json.loads(Path(args.out).read_text())
        if all(earlier["args"].get(k) == getattr(args, k) for k in settings):
            result["starts"] = earlier.get("starts", {})
            result["runs"] = {k: v for k, v in earlier["runs"].items()}
            if "criteria_correlation" in earlier:
                result["criteria_correlation"] = earlier["criteria_correlation"]
            result["merged"] = {
                **dict.fromkeys(earlier["runs"], earlier["environment"]["commit"]),
                **earlier.get("merged", {}),
            }
    Path(args.work).mkdir(parents=True, exist_ok=True)
    state_file = Path(args.work) / "prepare.json"
    state_file.write_text(json.dumps({k: result[k] for k in ("starts", "criteria_correlation") if k in result}))
    subprocess.run([sys.executable, __file__, "--prepare", str(state_file), *flags], check=True)
    state = json.loads(state_file.read_text())
    args.lora_rank = result["args"]["lora_rank"] = state.pop("lora_rank")
    result.update(state)
    write_json(args.out, result)
    for task in args.tasks:
        for arm in arms:
            name = f"{task}-{arm}"
            cmd = [sys.executable, __file__, "--run-arm", task, arm, "--lora-rank", str(args.lora_rank), *flags]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"arm {name} failed:\n{proc.stderr[-3000:]}")
            result["runs"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
            result.get("merged", {}).pop(name, None)
            write_json(args.out, result)
            print(name, json.dumps(result["runs"][name]), flush=True)
    summarize(result)
    write_json(args.out, result)
    print(json.dumps(result.get("summary"), indent=2))


def summarize(result: dict) -> None:
    """Each arm's gain on GSM8K answer ppl (and WikiText-2) as a fraction of full fine-tuning's, from its task's
    start, (start - arm) / (start - full): task A starts from the dense model, task B from the one-shot model
    ("recovered"); and each arm's peak RSS as a multiple of full fine-tuning's in its task."""
    runs, starts = result["runs"], result.get("starts", {})
    summary = {}
    for task, start in (("A", "A-dense"), ("B", "B-oneshot")):
        full = runs.get(f"{task}-full")
        if full is None or start not in starts:
            continue
        for metric in ("gsm8k_answer_ppl", "wikitext2_ppl"):
            gain = starts[start][metric] - full[metric]
            for name, run in runs.items():
                if name.startswith(f"{task}-"):
                    rss, full_rss = run["loop"].get("peak_rss_mb"), full["loop"].get("peak_rss_mb")
                    row = summary.setdefault(name, {"peak_rss_vs_full": rss / full_rss if rss and full_rss else None})
                    row[f"recovered_{metric}"] = (starts[start][metric] - run[metric]) / gain if gain else None
    result["summary"] = summary


if __name__ == "__main__":
    main()
