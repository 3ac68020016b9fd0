"""Adaptive sparse training benchmark: 2:4 recovery with adaptive masks (AST) against a fixed mask.

Every variant trains on the same token budget of GSM8K train (plain format, batch 4, lr 2e-4, as
`recovery.py`) with the same losses (AST's mix: CE 0.33 + KL 0.67 at T = 2 from the dense model as
teacher):

- `oneshot`: SparseGPT 2:4 of the dense model (the default one-shot settings; `--damp 0.01` is the
  dampening of the arms recorded before it became 3%), not trained (the starting point of `fixed`);
- `fixed`: that model fine-tuned with its mask held (`--method standard`);
- `ast`: the dense model trained with adaptive 2:4 masks (magnitude, SR-STE);
- `ast-sparsegpt`: AST (magnitude) started from the SparseGPT 2:4 model, its pruned weights at zero;
- `ast-slorb`: AST (magnitude) with SLoRB branches (k = 16);
- `ast-wanda`: AST with Wanda masks (the default metric);
- `ast-wanda-slorb`: AST with Wanda masks and SLoRB branches;
- `ast-sparsegpt-wanda`: AST with Wanda masks started from the SparseGPT 2:4 model;
- `ast-sparsegpt-teacher`: AST with Wanda masks started from the SparseGPT 2:4 model and its mask,
  the pruned weights set to the dense model's values (`pruned_start` 'teacher');
- `ast-sparsegpt-capped`: as `ast-sparsegpt-teacher`, the teacher's values capped below each group's
  kept scores (`pruned_start` 'capped'), so the one-shot mask holds until training moves it;
- `fixed-wanda`: the Wanda 2:4 model of the dense one (the mask `ast-wanda` starts from, dense values
  kept) fine-tuned with that mask held: what `ast-wanda` gains by moving its mask;
- `fixed-mixcal`, `ast-mixcal-capped`: `fixed` and `ast-sparsegpt-capped` from a SparseGPT 2:4 start
  calibrated on half GSM8K, half sampled text (the same number of tokens as the default calibration):
  with `--data self|mix` the start is then fitted to both kinds of text the arms train on; with GSM8K
  alone it trades a little of the start's GSM8K fit for a general one;
- `fixed-sh`, `ast-wanda-sh`: `fixed` and `ast-wanda` with the recovery recipes' losses instead
  (CE 1 + KL 3 at T = 1 + square-head 10 over every block's output, as `recovery.py`).

`--data self` trains the chosen arms on text sampled from the dense model instead of GSM8K (the same
token budget, in sequences of 192 tokens, about a GSM8K example's length, so the arms take as many
steps): data-free distillation stands in for the general corpus AST's paper trains on. Those arms are
named NAME-self, and every one of them trains on the same sampled text (sampled once, kept in `--work`).
`--data mix` (arms NAME-mix) trains on half of each: the first half of those sampled rows joined to as
many GSM8K examples (`self_mix`), one pass over both.

Each is evaluated on WikiText-2 (8 windows of 2048) and GSM8K test answer perplexity (200 rows);
the summary gives the fraction of the one-shot WikiText-2 gap each arm closes,
(one-shot - arm) / (one-shot - dense). Step costs come from alternating short runs of the fixed
and the AST loops over the same batches (the long arms run far apart in time). Each arm
takes about a quarter of an hour on 2 cores; arms run separately merge into one JSON (`--variants`,
same other settings; `--seed N` reruns arms with another data order, as NAME-seedN). Run it alone
on the machine:

    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/adaptive.py --out benchmarks/results/adaptive.json

(Not `ast.py`: a script of that name would shadow the standard library's `ast` module.)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from environment import environment
from sparsefit.atomic import write_json
from sparsefit.data.self_generated import load_or_sample, sample_from_model
from sparsefit.evaluation.gsm8k import evaluate_answer_ppl
from sparsefit.evaluation.tasks import evaluate_perplexity
from sparsefit.models import load_model_and_tokenizer
from sparsefit.models.offload import reuse_freed_memory
from sparsefit.pruning import OneShotConfig, oneshot
from sparsefit.pruning.config import PRESETS
from sparsefit.training import FinetuneConfig, finetune

if TYPE_CHECKING:
    import torch

VARIANTS = (
    "oneshot",
    "fixed",
    "ast",
    "ast-sparsegpt",
    "ast-slorb",
    "ast-wanda",
    "ast-wanda-slorb",
    "ast-sparsegpt-wanda",
    "fixed-sh",
    "ast-wanda-sh",
    "ast-sparsegpt-teacher",
    "fixed-wanda",
    "ast-sparsegpt-capped",
    "fixed-mixcal",
    "ast-mixcal-capped",
)
# Rows of the sampled training text (`--data self|mix`): about the mean length of a GSM8K train example in
# plain format, so a token budget takes as many steps on either data.
SELF_LEN = 192
# The recovery recipes' loss mix (`recovery.py`, builtin recipes), for the `-sh` arms.
SQUARE_HEAD_MIX = {"ce_weight": 1.0, "kl_weight": 3.0, "temperature": 1.0, "square_head_weight": 10.0}


def evaluate(model, tokenizer, args) -> dict:  # noqa: ANN001
    model.eval()
    wiki = evaluate_perplexity(
        model, tokenizer, "wikitext2", seq_len=2048, max_windows=args.wiki_windows, progress=False
    )
    ans = evaluate_answer_ppl(model, tokenizer, limit=args.answer_rows, progress=False)
    return {"wikitext2_ppl": wiki["ppl"], "gsm8k_answer_ppl": ans["ppl"]}


def nm_violations(model, n: int = 2, m: int = 4) -> int:  # noqa: ANN001
    """Groups of m inputs with more than n nonzero weights, over the decoder linears."""
    from sparsefit.training.masks import decoder_linears

    total = 0
    for module in decoder_linears(model).values():
        w = module.weight.detach()
        total += int(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) > n).sum())
    return total


def interleaved_speed(work: Path, tok, base: dict, pruned, dense, teacher, args, self_text) -> dict:  # noqa: ANN001
    """Tokens/s of the fixed-mask and the AST loop (with and without SLoRB) in alternating short runs
    over the same batches: the long arms run many minutes apart, and this machine's speed drifts."""
    short = {**base, "max_tokens": None, "max_steps": args.speed_steps}
    loops = {
        "fixed": (pruned, {}),
        "ast": (dense, {"method": "ast", "ast": {"mask_every": 5, "mask_metric": "magnitude"}}),  # 2x the updates
        "ast-slorb": (dense, {"method": "ast", "ast": {"mask_every": 5, "mask_metric": "magnitude", "slorb": True}}),
    }
    seconds, tokens = dict.fromkeys(loops, 0.0), dict.fromkeys(loops, 0)
    for _ in range(args.speed_rounds):
        for name, (start, options) in loops.items():
            config = FinetuneConfig(**short, **options)
            m = finetune(copy.deepcopy(start), tok, config, work / f"speed-{name}", teacher=teacher, overwrite=True,
                         progress=False, self_text=self_text)  # fmt: skip
            seconds[name] += m["train_seconds"]
            tokens[name] += m["tokens"]
    rate = {k: tokens[k] / seconds[k] for k in loops}
    return {
        "rounds": args.speed_rounds,
        "steps_per_run": args.speed_steps,
        "mask_every": 5,
        "tokens_per_second": rate,
        "step_cost_vs_fixed": {k: rate["fixed"] / v for k, v in rate.items()},
    }


def arm_name(variant: str, seed: int, data: str = "gsm8k") -> str:
    """The arm's name in the JSON: fine-tunes on sampled text get '-self' (or '-mix'), with another data
    order than seed 0's '-seedN'."""
    return variant + ("" if data == "gsm8k" else f"-{data}") + (f"-seed{seed}" if seed else "")


def sampled_text(model, tok, tokens: int, work: Path) -> torch.Tensor:  # noqa: ANN001
    """`tokens` tokens sampled from `model` (temperature 1, seed 0) in rows of SELF_LEN, kept in `work`
    so every `-self` arm trains on the same text (and every `-mix` arm on its first half)."""
    rows = -(-tokens // SELF_LEN)
    path = work / f"self-text-{rows}x{SELF_LEN}.safetensors"
    return load_or_sample(path, lambda: sample_from_model(model, tok, rows, SELF_LEN, seed=0))


# Every arm's one-shot start: SparseGPT 2:4 with the default settings, its dampening from `--damp`.
START = dict(method="sparsegpt", structure="2:4")
# Arguments that runs recorded before they existed had, for merging: the 1% dampening of the old default.
LEGACY_ARGS = {"damp": 0.01}

# The sampled half of the mixed calibration: half the default 64 x 512 tokens.
MIXCAL_SELF_TOKENS = 64 * 512 // 2


def mixed_calibration(model, tok, self_text: torch.Tensor, config: OneShotConfig) -> list[torch.Tensor]:  # noqa: ANN001
    """Calibration batches of half GSM8K (`config`'s draw's first half) and half sampled rows: as many
    tokens as that calibration, in its batch size."""
    from sparsefit.pruning.oneshot import calibration_batch

    gsm8k, _ = calibration_batch(model, tok, config, progress=False)
    half = gsm8k[: len(gsm8k) // 2]
    rows = -(-half.numel() // self_text.shape[1])
    return [*half.split(config.batch_size), *self_text[:rows].split(config.batch_size)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=150_000, help="token budget of each fine-tune")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--wiki-windows", type=int, default=8)
    p.add_argument("--answer-rows", type=int, default=200)
    p.add_argument("--speed-rounds", type=int, default=2, help="alternating short runs of each loop (0 skips)")
    p.add_argument("--speed-steps", type=int, default=10, help="steps of each short run")
    p.add_argument("--seed", type=int, default=0, help="fine-tunes' data order; arms of another seed get '-seedN'")
    p.add_argument("--data", choices=("gsm8k", "self", "mix"), default="gsm8k",
                   help="training text: GSM8K train, sampled from the dense model, or half each")  # fmt: skip
    p.add_argument("--damp", type=float, default=PRESETS["best"]["damp"], help="dampening of the one-shot start")
    p.add_argument("--work", default="runs/bench-ast")
    p.add_argument("--out", default="benchmarks/results/adaptive.json")
    args = p.parse_args()
    reuse_freed_memory()  # as the CLI's training commands do
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(unknown)}")
    work = Path(args.work)
    result: dict = {"args": vars(args), "environment": environment(), "runs": {}}
    same = ("model", "tokens", "batch_size", "lr", "wiki_windows", "answer_rows", "damp")
    if Path(args.out).is_file():  # arms of an earlier run with the same settings merge into this one
        earlier = json.loads(Path(args.out).read_text())
        if all(earlier["args"].get(k, LEGACY_ARGS.get(k)) == getattr(args, k) for k in same):
            redone = {arm_name(v, args.seed, args.data) for v in variants}
            result["runs"] = {k: v for k, v in earlier["runs"].items() if k not in redone}
            commits = {**dict.fromkeys(earlier["runs"], earlier["environment"]["commit"]), **earlier.get("merged", {})}
            result["merged"] = {k: commits[k] for k in result["runs"]}
            cpus = {**dict.fromkeys(earlier["runs"], earlier["environment"]["cpu"]), **earlier.get("merged_cpu", {})}
            result["merged_cpu"] = {k: cpus[k] for k in result["runs"]}  # arms may come from different CPUs
            if args.speed_rounds == 0 and "interleaved_speed" in earlier:
                result["interleaved_speed"] = earlier["interleaved_speed"]
                result["merged"]["interleaved_speed"] = commits.get(
                    "interleaved_speed", earlier["environment"]["commit"]
                )

    def record(name: str, data: dict) -> None:
        result["runs"][name] = data
        write_json(args.out, result)  # after every run, so a partial run still leaves numbers
        print(name, json.dumps(data), flush=True)

    dense, tok = load_model_and_tokenizer(args.model, "float32", "cpu")
    if "dense" not in result["runs"]:
        record("dense", evaluate(dense, tok, args))
    teacher = copy.deepcopy(dense)  # frozen by the loop; the starting models stay trainable
    t = time.perf_counter()
    pruned = copy.deepcopy(dense)
    start_config = OneShotConfig(**START, damp=args.damp)
    oneshot(pruned, tok, start_config, progress=False)
    seconds = time.perf_counter() - t
    if "oneshot" in variants:
        record("oneshot", {**evaluate(pruned, tok, args), "seconds": seconds})

    base = dict(
        dataset="gsm8k", format="plain", max_tokens=args.tokens, batch_size=args.batch_size, lr=args.lr,
        teacher="dense", ce_weight=0.33, kl_weight=0.67, temperature=2.0, checkpoint_every=0, checkpoint_minutes=0,
        seed=args.seed,
    )  # fmt: skip
    self_text = sampled_text(dense, tok, args.tokens, work) if args.data != "gsm8k" else None
    if args.data == "self":
        base.update(dataset="self", self_samples=len(self_text), seq_len=SELF_LEN)
    elif args.data == "mix":  # half the rows, joined to as many GSM8K examples of about the same mean length
        self_text = self_text[: len(self_text) // 2]
        base.update(self_mix=len(self_text), limit=len(self_text))
    if self_text is not None:
        result["self_text_sha256"] = hashlib.sha256(self_text.numpy().tobytes()).hexdigest()
    mixcal = mixcal_eval = None
    if any("mixcal" in v for v in variants):
        mixcal = copy.deepcopy(dense)
        # Arms on GSM8K alone sample only the calibration's rows: each row has its own seed, so they
        # are the first rows of the training text the other arms sample (to rounding across CPUs).
        text = self_text if self_text is not None else sampled_text(dense, tok, MIXCAL_SELF_TOKENS, work)
        calib = mixed_calibration(dense, tok, text, start_config)
        oneshot(mixcal, tok, start_config, calib=calib, progress=False)
        mixcal_eval = evaluate(mixcal, tok, args)
        if "oneshot-mixcal" not in result["runs"]:
            record("oneshot-mixcal", mixcal_eval)
        else:  # sampled text can differ across CPUs: each mixcal arm records its own start below
            print(
                "oneshot-mixcal now", json.dumps(mixcal_eval), "recorded", json.dumps(result["runs"]["oneshot-mixcal"])
            )
    runs = {
        "fixed": (pruned, {}),
        "ast": (dense, {"method": "ast", "ast": {"mask_metric": "magnitude"}}),
        "ast-sparsegpt": (pruned, {"method": "ast", "ast": {"mask_metric": "magnitude", "pruned_start": "zero"}}),
        "ast-slorb": (dense, {"method": "ast", "ast": {"mask_metric": "magnitude", "slorb": True}}),
        "ast-wanda": (dense, {"method": "ast", "ast": {"mask_metric": "wanda"}}),
        "ast-wanda-slorb": (dense, {"method": "ast", "ast": {"mask_metric": "wanda", "slorb": True}}),
        "ast-sparsegpt-wanda": (pruned, {"method": "ast", "ast": {"mask_metric": "wanda", "pruned_start": "zero"}}),
        "ast-sparsegpt-teacher": (
            pruned,
            {"method": "ast", "ast": {"mask_metric": "wanda", "pruned_start": "teacher"}},
        ),
        "ast-sparsegpt-capped": (
            pruned,
            {"method": "ast", "ast": {"mask_metric": "wanda", "pruned_start": "capped"}},
        ),
        "fixed-wanda": (None, {}),  # built below only when asked
        "fixed-mixcal": (mixcal, {}),
        "ast-mixcal-capped": (mixcal, {"method": "ast", "ast": {"mask_metric": "wanda", "pruned_start": "capped"}}),
        "fixed-sh": (pruned, SQUARE_HEAD_MIX),
        "ast-wanda-sh": (dense, {"method": "ast", "ast": {"mask_metric": "wanda"}, **SQUARE_HEAD_MIX}),
    }
    for name, (start, options) in runs.items():
        if name not in variants:
            continue
        if start is None:  # fixed-wanda
            start = copy.deepcopy(dense)
            oneshot(start, tok, OneShotConfig(method="wanda", structure="2:4"), progress=False)
        model = copy.deepcopy(start)
        config = FinetuneConfig(**{**base, **options})
        out = work / arm_name(name, args.seed, args.data)
        m = finetune(model, tok, config, out, teacher=teacher, overwrite=True, progress=False, self_text=self_text)
        flips = [json.loads(line).get("mask_flip_rate") for line in (out / "train_log.jsonl").open()]
        loop = {k: m[k] for k in ("steps", "tokens", "train_seconds", "tokens_per_second", "final_loss", "bf16")}
        loop.update(sparsity=m["sparsity"], revived_weights=m["revived_weights"], slorb=m.get("slorb"))
        loop["model_parameters"] = sum(p.numel() for p in dense.parameters())
        loop["nm_violations"] = nm_violations(model)
        loop["mask_flip_rate"] = [f for f in flips if f is not None]
        arm = {**evaluate(model, tok, args), "loop": loop}
        if "mixcal" in name:
            arm["start"] = mixcal_eval
        record(arm_name(name, args.seed, args.data), arm)

    if args.speed_rounds > 0:
        result["interleaved_speed"] = interleaved_speed(work, tok, base, pruned, dense, teacher, args, self_text)
        print("interleaved", json.dumps(result["interleaved_speed"]), flush=True)
    r = result["runs"]
    if {"dense", "oneshot"} <= set(r):
        gap = r["oneshot"]["wikitext2_ppl"] - r["dense"]["wikitext2_ppl"]
        result["summary"] = {
            name: {
                "wikitext2_ppl": run["wikitext2_ppl"],
                "gsm8k_answer_ppl": run["gsm8k_answer_ppl"],
                "gap_closed": (r["oneshot"]["wikitext2_ppl"] - run["wikitext2_ppl"]) / gap,
            }
            for name, run in r.items()
            if name != "dense"
        }
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(args.out, result)
    print(json.dumps(result.get("summary"), indent=2))


if __name__ == "__main__":
    main()
