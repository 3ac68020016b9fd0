"""Calibration text benchmark: what one-shot SparseGPT keeps of general text and of the task, by calibration.

The builtin model pruned by the default one-shot settings (SparseGPT, preset best) at 50% and at 2:4,
each calibrated three ways with as many tokens (64 x 512 by default):

- `gsm8k`: GSM8K train, the default;
- `mix`: half GSM8K train, half text sampled from the model (`--num-samples 32 --self-mix 32`);
- `self`: all sampled from the model (`--calib self`).

Each model is evaluated on WikiText-2 (8 windows of 2048: general text the calibration never saw) and
GSM8K test answer perplexity (200 rows: the task). Run it alone on the machine:

    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/calibration.py --out benchmarks/results/calibration.json
"""

from __future__ import annotations

import argparse
import copy
import time

from environment import environment
from sparsefit.atomic import write_json
from sparsefit.evaluation.gsm8k import evaluate_answer_ppl
from sparsefit.evaluation.tasks import evaluate_perplexity
from sparsefit.models import load_model_and_tokenizer
from sparsefit.pruning import OneShotConfig, oneshot

STRUCTURES = {"50%": {"sparsity": 0.5}, "2:4": {"structure": "2:4"}}


def calibrations(num: int) -> dict[str, dict]:
    """The config fields of each calibration, every one `num` sequences."""
    return {
        "gsm8k": {"calib": "gsm8k", "num_samples": num},
        "mix": {"calib": "gsm8k", "num_samples": num // 2, "self_mix": num - num // 2},
        "self": {"calib": "self", "num_samples": num},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--num-samples", type=int, default=64, help="calibration sequences of each arm")
    p.add_argument("--structures", default=",".join(STRUCTURES))
    p.add_argument("--calibrations", default="gsm8k,mix,self")
    p.add_argument("--wiki-windows", type=int, default=8)
    p.add_argument("--answer-rows", type=int, default=200)
    p.add_argument("--out", default="benchmarks/results/calibration.json")
    args = p.parse_args()
    arms = calibrations(args.num_samples)
    unknown = sorted({*args.structures.split(","), *args.calibrations.split(",")} - {*STRUCTURES, *arms})
    if unknown:
        raise SystemExit(f"unknown structures or calibrations: {', '.join(unknown)}")
    result: dict = {"args": vars(args), "environment": environment(), "runs": {}}
    dense, tok = load_model_and_tokenizer(args.model, "float32", "cpu")

    def evaluate(model) -> dict:  # noqa: ANN001
        wiki = evaluate_perplexity(
            model, tok, "wikitext2", seq_len=2048, max_windows=args.wiki_windows, progress=False
        )  # fmt: skip
        answers = evaluate_answer_ppl(model, tok, limit=args.answer_rows, progress=False)
        return {"wikitext2_ppl": wiki["ppl"], "gsm8k_answer_ppl": answers["ppl"]}

    def record(name: str, data: dict) -> None:
        result["runs"][name] = data
        write_json(args.out, result)  # after every arm, so a partial run still leaves numbers
        print(name, data, flush=True)

    record("dense", evaluate(dense))
    for structure in args.structures.split(","):
        for calib in args.calibrations.split(","):
            model = copy.deepcopy(dense)
            config = OneShotConfig(method="sparsegpt", **STRUCTURES[structure], **arms[calib])
            t = time.perf_counter()
            report = oneshot(model, tok, config, progress=False)
            seconds = time.perf_counter() - t
            record(
                f"{structure} {calib}",
                {**evaluate(model), "seconds": seconds, "calibration": report.calibration.model_dump()},
            )
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
