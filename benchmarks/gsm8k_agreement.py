"""GSM8K on the embedded model: sparsefit's scorer and lm-evaluation-harness on the same rows.

Writes accuracy (strict and flexible, with standard errors), generation throughput, answer
perplexity, and the per-sample agreement between the two scorers:

    SPARSEFIT_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \\
        python benchmarks/gsm8k_agreement.py --limit 200 --out benchmarks/results/gsm8k.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from environment import environment
from sparsefit.evaluation.answers import extract_flexible, extract_strict, is_correct
from sparsefit.evaluation.gsm8k import evaluate_answer_ppl, evaluate_gsm8k
from sparsefit.evaluation.harness import run_harness
from sparsefit.models import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/gsm8k.json")
    args = parser.parse_args()
    model, tok = load_model_and_tokenizer(args.model)
    samples_path = Path(args.out).with_suffix(".samples.jsonl")
    ours = evaluate_gsm8k(
        model, tok, limit=args.limit, chat=True, batch_size=args.batch_size, samples_path=samples_path, progress=False
    )
    print(
        f"sparsefit: strict {ours['strict_match']:.4f} flexible {ours['flexible_match']:.4f} "
        f"in {ours['seconds']:.0f} s ({ours['tokens_per_second']:.0f} tok/s)",
        flush=True,
    )
    answer_ppl = evaluate_answer_ppl(model, tok, limit=args.limit, progress=False)
    print(f"answer ppl {answer_ppl['ppl']:.4f}", flush=True)
    start = time.perf_counter()
    harness = run_harness(
        model,
        tok,
        ["gsm8k_local"],
        limit=args.limit,
        num_fewshot=0,
        batch_size=args.batch_size,
        chat=True,
        log_samples=True,
    )
    harness_seconds = time.perf_counter() - start
    our_samples = [json.loads(line) for line in samples_path.read_text().splitlines()]
    by_doc: dict[int, dict] = {}
    for s in harness["samples"]["gsm8k_local"]:
        by_doc.setdefault(s["doc_id"], {})[s["filter"]] = s
    same_generation = same_strict = same_flexible = 0
    for doc_id, filters in by_doc.items():
        theirs = filters["strict-match"]["resps"][0][0]
        mine = our_samples[doc_id]
        same_generation += mine["generation"] == theirs
        same_strict += mine["strict_correct"] == bool(filters["strict-match"]["exact_match"])
        same_flexible += mine["flexible_correct"] == bool(filters["flexible-extract"]["exact_match"])
        # our scorer applied to the harness's own generation must give the harness's verdict
        answer = filters["strict-match"]["doc"]["answer"]
        assert is_correct(extract_strict(theirs), answer) == bool(filters["strict-match"]["exact_match"])
        assert is_correct(extract_flexible(theirs), answer) == bool(filters["flexible-extract"]["exact_match"])
    metrics = harness["results"]["gsm8k_local"]
    result = {
        "environment": environment(),
        "model": args.model,
        "rows": args.limit,
        "num_fewshot": 0,
        "chat": True,
        "sparsefit": {k: v for k, v in ours.items() if k != "samples_file"},
        "answer_ppl": answer_ppl,
        "harness": {
            "strict_match": metrics["exact_match,strict-match"],
            "flexible_match": metrics["exact_match,flexible-extract"],
            "seconds": harness_seconds,
        },
        "agreement": {
            "rows": len(by_doc),
            "same_generation": same_generation,
            "same_strict_verdict": same_strict,
            "same_flexible_verdict": same_flexible,
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["harness"]), json.dumps(result["agreement"]))


if __name__ == "__main__":
    main()
