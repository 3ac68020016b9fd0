"""Recovery benchmark: the seed's sparse fine-tuning pipeline at CPU scale, on the embedded model.

1. dense fine-tune of `smollm2-135m` on GSM8K train (this becomes the teacher);
2. one-shot SparseGPT 50% of that teacher (64 x 512 GSM8K calibration);
3. sparse fine-tune with every pruned weight held at zero, distilled from the teacher
   (task CE + logit KL + per-layer square-head), with the same token budget as step 1.
After every stage: GSM8K test answer perplexity (teacher-forced, first 200 rows, plain prompt)
and WikiText-2 perplexity (8 windows of 2048). Tokens/s of each loop come from the same run,
so the sparse loop's throughput is quoted as a ratio to the dense loop's. Run it alone:

    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/recovery.py --out benchmarks/results/recovery.json

`--teacher-run DIR` reuses the dense fine-tune of an earlier run with the same settings (the
loop is deterministic) to study the sparse stage alone; the loops' speed ratio then comes from
the interleaved short runs only.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from environment import environment
from sparsefit.atomic import write_json
from sparsefit.evaluation.gsm8k import evaluate_answer_ppl
from sparsefit.evaluation.tasks import evaluate_perplexity
from sparsefit.models import load_model_and_tokenizer
from sparsefit.models.offload import reuse_freed_memory
from sparsefit.pruning import OneShotConfig, oneshot
from sparsefit.training import FinetuneConfig, finetune
from sparsefit.training.resume import BOOKKEEPING


def evaluate(model, tokenizer, args) -> dict:
    model.eval()
    ans = evaluate_answer_ppl(model, tokenizer, limit=args.answer_rows, progress=False)
    wiki = evaluate_perplexity(
        model, tokenizer, "wikitext2", seq_len=2048, max_windows=args.wiki_windows, progress=False
    )
    return {
        "gsm8k_answer_ppl": ans["ppl"],
        "wikitext2_ppl": wiki["ppl"],
        "eval_seconds": ans["seconds"] + wiki["seconds"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=150_000, help="token budget of each fine-tune")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the dense fine-tune")
    p.add_argument("--sparse-lr", type=float, default=2e-4, help="learning rate of the sparse fine-tune")
    p.add_argument(
        "--sparse-seed",
        type=int,
        default=0,
        help="data-order seed of the sparse fine-tune (the dense one uses 0): 1 draws other GSM8K examples "
        "than the teacher was trained on",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--ce-weight", type=float, default=1.0)
    p.add_argument("--kl-weight", type=float, default=3.0)
    p.add_argument("--square-head-weight", type=float, default=10.0)
    p.add_argument("--answer-rows", type=int, default=200)
    p.add_argument("--ab-rounds", type=int, default=3, help="alternating short runs of each loop (0 skips)")
    p.add_argument("--wiki-windows", type=int, default=8)
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=CHECKPOINT_EVERY,
        help="steps between checkpoints of both fine-tunes (their cost: benchmarks/checkpoint_overhead.py)",
    )
    p.add_argument("--work", default="runs/bench-recovery")
    p.add_argument(
        "--teacher-run",
        default=None,
        help="a finished dense fine-tune of an earlier run (its output directory): stage 1 is evaluated "
        "and its loop figures are taken from its metrics.json instead of training it again",
    )
    p.add_argument("--out", default="benchmarks/results/recovery.json")
    args = p.parse_args()
    reuse_freed_memory()  # as the CLI's training commands do
    work = Path(args.work)
    result: dict = {"environment": environment(), "args": vars(args), "stages": {}, "threads": torch.get_num_threads()}

    def record(stage: str, data: dict) -> None:
        result["stages"][stage] = data
        write_json(args.out, result)  # after every stage, so a partial run still leaves numbers
        print(stage, json.dumps({k: v for k, v in data.items() if not isinstance(v, dict)}), flush=True)

    common = dict(dataset="gsm8k", format="plain", max_tokens=args.tokens, batch_size=args.batch_size, lr=args.lr)
    common["checkpoint_every"] = args.checkpoint_every
    teacher_dir = Path(args.teacher_run) if args.teacher_run else work / "dense-ft"
    if args.teacher_run:  # checked before any work: it must be the fine-tune this run would train
        metrics = json.loads((teacher_dir / "metrics.json").read_text())
        expected = json.loads(FinetuneConfig(**common).model_dump_json())  # as metrics.json holds it
        differ = sorted(k for k in expected if k not in BOOKKEEPING and metrics["config"].get(k) != expected[k])
        if differ:
            raise SystemExit(f"--teacher-run {teacher_dir} was trained with other settings: {', '.join(differ)}")

    model, tok = load_model_and_tokenizer(args.model, "float32", "cpu")
    record("dense", evaluate(model, tok, args))

    if args.teacher_run:  # the dense fine-tune is deterministic: reuse one, and say so in the JSON
        model, tok = load_model_and_tokenizer(str(teacher_dir), "float32", "cpu")
        record("dense-ft", {**evaluate(model, tok, args), "loop": _loop(metrics), "reused_from": str(teacher_dir)})
    else:
        metrics = finetune(model, tok, FinetuneConfig(**common), teacher_dir)
        record("dense-ft", {**evaluate(model, tok, args), "loop": _loop(metrics)})
    teacher = copy.deepcopy(model)

    report = oneshot(model, tok, OneShotConfig(method="sparsegpt", sparsity=args.sparsity), progress=False)
    record(
        "oneshot",
        {**evaluate(model, tok, args), "sparsity": report["sparsity"]["overall"], "seconds": report["seconds"]},
    )

    common.update(lr=args.sparse_lr, seed=args.sparse_seed)
    distill = dict(
        teacher=str(teacher_dir),
        kl_weight=args.kl_weight,
        square_head_weight=args.square_head_weight,
        ce_weight=args.ce_weight,
    )
    metrics = finetune(model, tok, FinetuneConfig(**common, **distill), work / "sparse-ft", teacher=teacher)
    record("sparse-ft", {**evaluate(model, tok, args), "loop": _loop(metrics)})

    if args.ab_rounds > 0:
        result["interleaved_throughput"] = interleaved_throughput(work, tok, common, distill, teacher, args.ab_rounds)
        print("interleaved", json.dumps(result["interleaved_throughput"]), flush=True)

    s = result["stages"]
    result["summary"] = {
        # a reused dense loop ran in another session, at another machine speed: only the interleaved ratio counts
        "throughput_ratio_sparse_vs_dense": None
        if args.teacher_run
        else s["sparse-ft"]["loop"]["tokens_per_second"] / s["dense-ft"]["loop"]["tokens_per_second"],
        "interleaved_throughput_ratio": result.get("interleaved_throughput", {}).get("ratio"),
        "answer_ppl_sparse_ft_vs_dense_ft": s["sparse-ft"]["gsm8k_answer_ppl"] / s["dense-ft"]["gsm8k_answer_ppl"],
        "answer_ppl_oneshot_vs_dense_ft": s["oneshot"]["gsm8k_answer_ppl"] / s["dense-ft"]["gsm8k_answer_ppl"],
        "revived_weights": s["sparse-ft"]["loop"]["revived_weights"],
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(args.out, result)
    print(json.dumps(result["summary"], indent=2))


AB_STEPS = 5  # steps per short run of the interleaved throughput measurement
CHECKPOINT_EVERY = 25  # steps: a kill costs at most this much training


def interleaved_throughput(work: Path, tok, common: dict, distill: dict, teacher, rounds: int) -> dict:  # noqa: ANN001
    """The two loops' speed again, alternated in short runs over the same batches.

    The fine-tunes above run 20+ minutes apart, and this shared machine's speed drifts by up to
    20% over minutes; alternating short runs of each loop puts the same drift on both sides.
    """
    dense, _ = load_model_and_tokenizer(distill["teacher"], "float32", "cpu")
    sparse, _ = load_model_and_tokenizer(str(work / "sparse-ft"), "float32", "cpu")
    short = {**common, "max_tokens": None, "max_steps": AB_STEPS, "checkpoint_every": 0}
    seconds = {"dense": 0.0, "distilled": 0.0}
    tokens = {"dense": 0, "distilled": 0}
    for _ in range(rounds):
        runs = (
            ("dense", dense, FinetuneConfig(**short), None),
            ("distilled", sparse, FinetuneConfig(**short, **distill), teacher),
        )
        for name, model, config, t in runs:
            m = finetune(model, tok, config, work / f"ab-{name}", teacher=t, progress=False)
            seconds[name] += m["train_seconds"]
            tokens[name] += m["tokens"]
    rate = {k: tokens[k] / seconds[k] for k in seconds}
    return {
        "rounds": rounds,
        "steps_per_run": AB_STEPS,
        "tokens_per_second": rate,
        "ratio": rate["distilled"] / rate["dense"],
    }


def _loop(m: dict) -> dict:
    keys = ("steps", "tokens", "train_seconds", "tokens_per_second", "final_loss", "bf16", "sparsity")
    keys += ("revived_weights", "checkpoints", "checkpoint_seconds")
    return {k: m[k] for k in keys}


if __name__ == "__main__":
    main()
