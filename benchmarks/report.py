"""Writes benchmarks/README.md from benchmarks/results/: one section per result file, each with
the run's environment (commit, date, CPU, versions, device) and its numbers as tables.

    python benchmarks/report.py            # rewrite benchmarks/README.md
    python benchmarks/report.py --check    # exit 1 if the README is not what the results give
    python benchmarks/report.py --strict   # also exit 1 while a result is to re-run (see below)

Times are quoted as ratios to a yardstick measured in the same run wherever the benchmark has one.

Each result shows its age: how many commits its `environment.commit` is behind the commit the
README was generated at (named in its header, so `--check` counts to the same one). A result
from a tree with uncommitted changes (`+dirty`), without a recorded commit or CPU, or from a
commit that is not in this history is marked untraceable; those and the results more than
STALE_AFTER commits behind are listed, with their age, date, CPU and the command that refreshes
them, under "To re-run". `--strict` fails while that list holds any result but a stale one that
needs a GPU (the CPU machine cannot refresh it; its row says so).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
STALE_AFTER = 50  # commits behind the reference commit before a result is listed for a re-run
_DATA = "SPARSEFIT_DATA_DIR=../shared/data"

# result file stem -> the command that measures it again (each script's docstring says more)
RERUN = {
    "quick": f"{_DATA} python benchmarks/quick.py",
    "oneshot": f"{_DATA} python benchmarks/oneshot.py --seeds 0 1 2",
    "oneshot_avx2": "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 "
    f"{_DATA} python benchmarks/oneshot.py --runs sparsegpt-50 sparsegpt-2:4 wanda-50 --one-seed sparsegpt-2:4 "
    "wanda-50 --seeds 0 1 2 --out benchmarks/results/oneshot_avx2.json",
    "calibration": f"{_DATA} python benchmarks/calibration.py --out benchmarks/results/calibration.json",
    "quantize": f"{_DATA} python benchmarks/quantize.py --dense",
    "generation": f"{_DATA} python benchmarks/generation.py",
    "checkpoint_overhead": f"{_DATA} python benchmarks/checkpoint_overhead.py",
    "recovery": f"{_DATA} python benchmarks/recovery.py --out benchmarks/results/recovery.json",
    "adaptive": f"{_DATA} python benchmarks/adaptive.py --damp 0.01 --out benchmarks/results/adaptive.json",
    "adapters": f"{_DATA} python benchmarks/adapters.py --tasks A,B --tokens 50000 "
    "--out benchmarks/results/adapters.json",
    "adapters_150k": f"{_DATA} python benchmarks/adapters.py --tasks A,B --out benchmarks/results/adapters_150k.json",
    "adaptive_lr4e-4": f"{_DATA} python benchmarks/adaptive.py --lr 4e-4 --damp 0.01 "
    "--out benchmarks/results/adaptive_lr4e-4.json",
    "adaptive_300k": f"{_DATA} python benchmarks/adaptive.py --tokens 300000 --lr 4e-4 --damp 0.01 "
    "--out benchmarks/results/adaptive_300k.json",
    "adaptive_damp3": f"{_DATA} python benchmarks/adaptive.py --lr 4e-4 --out benchmarks/results/adaptive_damp3.json",
    "gsm8k": f"{_DATA} python benchmarks/gsm8k_agreement.py --limit 200 --out benchmarks/results/gsm8k.json",
    "reconstruct_error": f"{_DATA} python benchmarks/reconstruct_error.py",
    "reference_llmcompressor": f"{_DATA} python benchmarks/reference_llmcompressor.py "
    "--lc-python /tmp/lcvenv/bin/python",
    "moe_calibration": f"{_DATA} python benchmarks/moe_calibration.py --out benchmarks/results/moe_calibration.json",
    "sparse24_gpu": "python benchmarks/sparse24_gpu.py --out benchmarks/results/sparse24_gpu.json (on a GPU)",
    "runtime": f"{_DATA} python benchmarks/runtime.py",
    "serve": f"{_DATA} python benchmarks/serve.py --llama-server ../llamacpp/llama.cpp/build/bin/llama-server "
    "--gguf ../llamacpp/smollm2-135m-Q8_0.gguf",
    "gguf": f"{_DATA} python benchmarks/gguf_export.py --llama-cpp-dir ../llamacpp --chunks 16",
    "fuzz": "python benchmarks/fuzz.py --scale 20",
    "scale": f"{_DATA} python benchmarks/scale.py --out benchmarks/results/scale.json",
}

# result file stem -> the script that writes it
SCRIPTS = {
    "quick": "quick.py",
    "oneshot": "oneshot.py",
    # torch, oneDNN and MKL limited to AVX2 (see oneshot.py): a CPU without AVX-512 or native bf16
    "oneshot_avx2": "oneshot.py",
    "calibration": "calibration.py",
    "quantize": "quantize.py",
    "generation": "generation.py",
    "checkpoint_overhead": "checkpoint_overhead.py",
    "recovery": "recovery.py",
    "adaptive": "adaptive.py",
    "adapters": "adapters.py",
    # the script's default budget, `--tokens 150000`, for task B's full, lora and rows-taylor arms
    "adapters_150k": "adapters.py",
    "adaptive_lr4e-4": "adaptive.py",
    # twice the default budget (`--tokens 300000`, lr 4e-4): whether AST's lead grows with training
    "adaptive_300k": "adaptive.py",
    # lr 4e-4, from the default one-shot start (3% dampening): the arms of the task's definition
    "adaptive_damp3": "adaptive.py",
    "gsm8k": "gsm8k_agreement.py",
    "reconstruct_error": "reconstruct_error.py",
    "reference_llmcompressor": "reference_llmcompressor.py",
    "moe_calibration": "moe_calibration.py",
    "sparse24_gpu": "sparse24_gpu.py",
    "runtime": "runtime.py",
    "serve": "serve.py",
    # not gguf.py: a script beside the others named gguf would shadow the gguf package
    "gguf": "gguf_export.py",
    "fuzz": "fuzz.py",
    "scale": "scale.py",
}


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _git(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *cmd], cwd=HERE, capture_output=True, text=True)


def resolve(commit: str) -> str | None:
    """The full hash of `commit` in this repository's history, or None (no git, unknown commit)."""
    try:
        proc = _git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def age(result: dict, reference: str) -> dict:
    """How traceable and how old a result is against the `reference` commit.

    `problem` (None for a traceable result) says why it cannot be traced to a clean commit of this
    history; `behind` counts the commits from its commit to the reference."""
    env = result.get("environment")
    if env is None:
        return {"problem": "records no environment (commit, CPU, versions)", "behind": None}
    commit = env.get("commit") or ""
    if not commit:
        return {"problem": "records no commit", "behind": None}
    if not env.get("cpu"):
        return {"problem": "records no CPU", "behind": None}
    if commit.endswith("+dirty"):
        return {"problem": f"measured on a tree with uncommitted changes to src/ ({commit[:12]}+dirty)",
                "behind": _behind(commit.removesuffix("+dirty"), reference)}  # fmt: skip
    behind = _behind(commit, reference)
    if behind is None:
        return {"problem": f"commit {commit[:12]} is not an ancestor of {reference[:12]}", "behind": None}
    return {"problem": None, "behind": behind}


def _behind(commit: str, reference: str) -> int | None:
    full = resolve(commit)
    if full is None or _git("merge-base", "--is-ancestor", full, reference).returncode != 0:
        return None
    return int(_git("rev-list", "--count", f"{full}..{reference}").stdout.strip())


def needs_gpu(result: dict) -> bool:
    return not str((result.get("environment") or {}).get("device", "cpu")).startswith("cpu")


def age_line(a: dict, reference: str, gpu: bool) -> str:
    if a["problem"]:
        return f"**Untraceable: this result {a['problem']}; re-run it (see To re-run).**"
    words = f"{a['behind']} commits behind {reference[:12]}"
    if a["behind"] > STALE_AFTER:
        words += f", stale (over {STALE_AFTER})" + ("; it needs a GPU" if gpu else "")
    return f"_Age: {words}._"


def environment_line(result: dict) -> str:
    env = result.get("environment")
    if env is None:
        return "_Environment not recorded: measured before the benchmarks recorded it._"
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v and k != "sparsefit")
    limits = env.get("isa_limits")
    limited = (
        f", its kernels limited to {env['cpu_capability']} ({', '.join(f'{k}={v}' for k, v in limits.items())})"
        if limits
        else ""
    )
    return (
        f"_Commit {env['commit'][:12]}, {env['date']}; {_cpu_words(env['cpu'])}{limited}, "
        f"{env['torch_threads']} torch threads; device {env['device']}; {versions}._"
    )


def _cpu_words(cpu: dict) -> str:
    bf16 = "native bf16" if cpu["native_bf16"] else ("AVX-512, no native bf16" if cpu["avx512"] else "no AVX-512")
    # bf16 matrix units: bf16 training runs much faster; results older than the field did not record them
    bf16 += {True: ", AMX", False: ", no AMX", None: ", AMX not recorded"}[cpu.get("amx")]
    return f"{cpu['model']}, {cpu['cores']} cores ({bf16})"


def docstring_summary(script: str) -> str:
    """The first paragraph of the benchmark script's docstring."""
    source = (HERE / script).read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    return " ".join(doc.split("\n\n")[0].split())


def oneshot(r: dict) -> str:
    yard = r["yardstick_dense_forward"]
    out = [
        f"{r['model']}, calibration {r['calibration']}, evaluation {r['eval']}, block-forward dtype "
        f"{r['compute_dtype']}. Dense WikiText-2 perplexity {f(r['dense']['ppl'])}. Yardstick: one dense "
        f"float32 forward over the calibration set, {f(yard['seconds'], 1)} s (mean of before and after the runs).",
        "",
    ]
    rows = []
    for name, run in r["runs"].items():
        seeds = run.get("per_seed")
        spread = ", ".join(f(s["ppl"]) for s in seeds.values()) if seeds else "-"
        order = "-" if name.startswith("magnitude") else "sequential" if run.get("sequential") else "two-pass"
        rows.append(
            [
                name, order, run.get("reconstruct_iters", 0), f(run["ppl"]), spread, f(run["sparsity"], 4),
                f(run["ratio_to_dense_forward"]) + "x", f(run["peak_rss_mb"], 0), f(run["process_peak_rss_mb"], 0),
            ]
        )  # fmt: skip
    header = [
        "run", "order", "refit steps", "ppl (mean)", "ppl per seed", "sparsity", "time / yardstick",
        "peak RSS MB (pruning)", "peak RSS MB (process)",
    ]  # fmt: skip
    out.append(table(header, rows))
    out.append("")
    out.append(
        "Runs without `-paper` use the defaults (`--preset best`); `-paper` adds `--preset paper`; "
        "`-inmemory` adds `--offload-dir none`; `-damp1` adds `--damp 0.01`. Seeds are calibration draws."
    )
    for added in r.get("appended", []):
        env = added["environment"]
        out.append("")
        out.append(
            f"Added later (commit {env['commit'][:12]}, {env['date']}): {', '.join(added['runs'])}, with their "
            f"own yardstick: {f(added['yardstick_dense_forward']['seconds'], 1)} s, the mean of "
            f"{f(added['yardstick_dense_forward']['before']['seconds'], 1)} s before and "
            f"{f(added['yardstick_dense_forward']['after']['seconds'], 1)} s after them."
        )
    return "\n".join(out)


def quantize(r: dict) -> str:
    def cell(run: dict, key: str, digits: int = 2) -> str:
        return f(run.get(key), digits) if run.get(key) is not None else "-"

    rows = [[name, "float", "-", f(v["gsm8k_answer_ppl"], 3), f(v["wikitext_ppl_first"]), f(v["wikitext_ppl_other"]),
             "-", "-", "-", "-"] for name, v in r["sources"].items()]  # fmt: skip
    for name, run in r["runs"].items():
        flags = " ".join(run["flags"]) if run.get("flags") else "llm-compressor GPTQModifier (W4A16, group 64)"
        rows.append([name, run["tool"], f"`{flags}`", f(run["gsm8k_answer_ppl"], 3), f(run["wikitext_ppl_first"]),
                     f(run["wikitext_ppl_other"]), run.get("revived_weights", "-"),
                     f(run["ratio_to_dense_forward"]) + "x" if "ratio_to_dense_forward" in run else "-",
                     f(run["peak_rss_mb"], 0), cell(run, "ratio_to_dense_bf16")])  # fmt: skip
    header = ["run", "tool", "settings", "GSM8K answer ppl", "WikiText-2 first", "WikiText-2 other", "revived",
              "time / yardstick", "peak RSS MB", "size vs dense bf16"]  # fmt: skip
    yard = r.get("yardstick_dense_forward")
    return "\n".join(
        [
            f"{r['model']}; pruned source: {r['pruning']}; quantization calibration {r['calibration']}; "
            f"evaluation: {r['eval']}. llm-compressor {r.get('llmcompressor', 'not run')}."
            + (f" Yardstick: {f(yard['seconds'], 1)} s." if yard else " (The run had not finished: no yardstick.)"),
            "",
            table(header, rows),
        ]
    )


def quick(r: dict) -> str:
    rows = [
        [name, f(s["seconds"], 0), f(s["sparsity"], 3), f(s["self_ppl"]), f(s["ppl"]), f(s["answer_ppl"], 3)]
        for name, s in r["stages"].items()
    ]
    p = r["self_ppl"]
    overrides = f" with `--set {' --set '.join(r['overrides'])}`" if r["overrides"] else ""
    return "\n".join(
        [
            f"`sparsefit run quick`{overrides}: {f(r['wall_seconds'] / 60, 1)} min from start to exit. Self-text "
            f"perplexity dense {f(p['dense'])}, one-shot {f(p['oneshot'])}, recovered {f(p['recovered'])}: "
            f"{f(100 * r['recovered_fraction_of_loss'], 0)}% of the one-shot loss won back.",
            "",
            table(["stage", "seconds", "sparsity", "self-text ppl", "WikiText-2 ppl", "GSM8K answer ppl"], rows),
        ]
    )


def generation(r: dict) -> str:
    g, s = r["greedy"], r["sampling"]
    a = r["args"]
    yard = g["generate-batch16"]["tokens_per_second"]
    rows = [["transformers `generate`, batch 16 (yardstick)", f(yard, 1), "1.00x", "-"]]
    for name, row in g.items():
        if name != "generate-batch16":
            rows.append([f"sparsefit, {name.split('-')[1]}", f(row["tokens_per_second"], 1),
                         f(row["speedup"]) + "x", f"{row['identical']}/{a['questions']}"])  # fmt: skip
    # sampling against sampling: the greedy yardstick stops rows early and would flatter sparsefit
    sampled = [
        ["transformers `generate(do_sample=True)`, batch 16 (yardstick)",
         f(s["generate-batch16"]["tokens_per_second"], 1), "1.00x"],
        ["sparsefit `sample_from_model`", f(s["sparsefit"]["tokens_per_second"], 1), f(s["speedup"]) + "x"],
    ]  # fmt: skip
    slots = " / ".join(str(n) for n in a["slots"])
    return "\n".join(
        [
            f"Greedy: the first {a['questions']} GSM8K test questions, up to {a['max_new_tokens']} new tokens. "
            f"The yardstick is `generate` in batches of 16, each row stopped by a Python stopping criterion, "
            f"not `generate`'s own `stop_strings` at its best batch size; sparsefit decodes {slots} rows at once. "
            "The ratios compare those two set-ups, not the two at the same batch size.",
            "",
            table(["generator", "tokens/s", "vs yardstick", "outputs identical to generate's"], rows),
            "",
            f"Sampling: {a['samples']} self-generated sequences of {a['sample_len']} tokens (the `quick` recipe's "
            "training text), temperature 1.",
            "",
            table(["generator", "tokens/s", "vs sampling yardstick"], sampled),
        ]
    )


def checkpoint_overhead(r: dict) -> str:
    return table(
        ["steps", "checkpoints", "training s", "checkpointing s", "overhead", "checkpoint size MB"],
        [[r["steps"], r["checkpoints"], f(r["train_seconds"], 1), f(r["checkpoint_seconds"], 1),
          f(100 * r["overhead"]) + "%", f(r["checkpoint_bytes"] / 2**20, 0)]],
    )  # fmt: skip


def recovery(r: dict) -> str:
    rows = []
    for name, stage in r["stages"].items():
        rows.append([name, f(stage["gsm8k_answer_ppl"], 3), f(stage["wikitext2_ppl"])])
    a, s = r["args"], r["summary"]
    return "\n".join(
        [
            f"{a['model']}, {a['tokens']} training tokens per fine-tune, lr {a['lr']}, batch {a['batch_size']}, "
            f"sparsity {a['sparsity']}, distillation weights CE {a['ce_weight']}, KL {a['kl_weight']}, "
            f"square-head {a['square_head_weight']}.",
            "",
            table(["stage", "GSM8K answer ppl", "WikiText-2 ppl"], rows),
            "",
            f"Sparse distilled loop vs dense loop, tokens/s: {f(s['throughput_ratio_sparse_vs_dense'])} "
            f"(interleaved short runs: {f(s['interleaved_throughput_ratio'])}). "
            f"Weights revived: {s['revived_weights']}.",
        ]
    )


def calibration(r: dict) -> str:
    a, runs = r["args"], r["runs"]
    rows = []
    for name, run in runs.items():
        # time as a ratio to the default (GSM8K-calibrated) arm of the same structure, same run
        base = runs.get(f"{name.split()[0]} gsm8k", {}).get("seconds")
        ratio = f"{run['seconds'] / base:.2f}x" if base and "seconds" in run else "-"
        rows.append([name, f(run["wikitext2_ppl"]), f(run["gsm8k_answer_ppl"], 3), ratio])
    half = a["num_samples"] // 2
    return "\n".join(
        [
            f"{a['model']}, SparseGPT with the default settings, {a['num_samples']} calibration sequences of 512 "
            f"tokens (seed 0) per arm: `gsm8k` all GSM8K train (the default), `mix` {half} GSM8K + "
            f"{a['num_samples'] - half} sampled from the model (`--num-samples {half} --self-mix "
            f"{a['num_samples'] - half}`), `self` all sampled (`--calib self`). WikiText-2 over "
            f"{a['wiki_windows']} windows of 2048, GSM8K answer perplexity over {a['answer_rows']} test rows. "
            "Time includes sampling, as a ratio to the `gsm8k` arm of the same structure.",
            "",
            table(["run", "WikiText-2 ppl", "GSM8K answer ppl", "time vs gsm8k"], rows),
        ]
    )


def adaptive(r: dict) -> str:
    a, runs, summary = r["args"], r["runs"], r.get("summary", {})
    rows = []
    starts = [n for n in ("dense", "oneshot") if n in runs]  # the references first, whenever they ran
    for name in [*starts, *(n for n in runs if n not in starts)]:
        run = runs[name]
        loop, s = run.get("loop", {}), summary.get(name, {})
        flips = loop.get("mask_flip_rate") or []
        slorb = loop.get("slorb")
        rows.append(
            [
                name,
                f(run["wikitext2_ppl"]),
                f(run["gsm8k_answer_ppl"], 3),
                f(s.get("gap_closed")),
                f"{slorb['parameters'] / loop['model_parameters']:.3f}" if slorb else "-",
                f"{flips[0]:.1e} -> {flips[-1]:.1e} ({len(flips)})" if flips else "-",
                loop.get("nm_violations", "-"),
            ]
        )
    return "\n".join(
        [
            f"{a['model']}, 2:4 (one-shot start: SparseGPT, dampening {a.get('damp', 0.01)}), "
            f"{a['tokens']} tokens of GSM8K train per arm (`-self` arms: text sampled from the "
            "dense model, in rows of 192 tokens; `-mix` arms: half of those rows and as many GSM8K examples; "
            "`mixcal` arms start from `oneshot-mixcal`, SparseGPT 2:4 calibrated on half GSM8K, half sampled rows; "
            f"batch {a['batch_size']}, lr {a['lr']}), CE 0.33 + KL 0.67 "
            "(T = 2) from the dense model (`-sh` arms: CE 1 + KL 3 at T = 1 + square-head 10); WikiText-2 over "
            f"{a['wiki_windows']} windows of 2048, GSM8K answer perplexity over {a['answer_rows']} test rows. "
            "Gap closed: (one-shot - arm) / (one-shot - dense) on WikiText-2. SLoRB: added parameters / model "
            "parameters. Mask flips: fraction of positions changed, first -> last update (updates).",
            "",
            table(
                [
                    "run",
                    "WikiText-2 ppl",
                    "GSM8K answer ppl",
                    "gap closed",
                    "SLoRB params",
                    "mask flips",
                    "N:M violations",
                ],
                rows,
            ),
            *_own_starts(runs),
            *_interleaved_speed(r.get("interleaved_speed")),
            *_merged(r.get("merged"), r.get("merged_cpu"), r["environment"]["cpu"]),
        ]
    )


def adapters(r: dict) -> str:
    a, runs, summary = r["args"], r["runs"], r.get("summary", {})
    rows = [[name, f(s["gsm8k_answer_ppl"], 3), f(s["wikitext2_ppl"]), "-", "-", "-", "-", "-"]
            for name, s in r.get("starts", {}).items()]  # fmt: skip
    for name, run in runs.items():
        loop, adapters, s = run["loop"], run.get("adapters") or {}, summary.get(name, {})
        sparsity = adapters.get("merged_sparsity", loop["sparsity"])
        rows.append(
            [
                name,
                f(run["gsm8k_answer_ppl"], 3),
                f(run["wikitext2_ppl"]),
                f"{loop['trainable_parameters'] / 1e6:.2f}M",
                "-"
                if loop.get("peak_rss_mb") is None
                else f"{loop['peak_rss_mb']:.0f}"
                + (f" ({s['peak_rss_vs_full']:.2f}x)" if s.get("peak_rss_vs_full") else ""),
                f(loop["tokens_per_second"], 0),
                f(sparsity, 4),
                f(s.get("recovered_gsm8k_answer_ppl")),
            ]
        )
    lines = [
        f"{a['model']}, {a['tokens']} tokens of GSM8K train per arm (batch {a['batch_size']}; lr {a['lr']} full, "
        f"{a['adapter_lr']} adapters), {a['rows']} rows per linear, LoRA rank {a['lora_rank']}. Task A fine-tunes "
        "the dense model, task B recovers its one-shot 50% model. Recovered: (start - arm) / (start - full) on "
        "GSM8K answer ppl, from the task's start. Sparsity: after the merge.",
        "",
        table(
            ["run", "GSM8K answer ppl", "WikiText-2 ppl", "trainable", "peak RSS MB", "tok/s", "sparsity", "recovered"],
            rows,
        ),  # fmt: skip
    ]
    c = r.get("criteria_correlation")
    if c:
        lines += [
            "",
            f"Row scores on task B's start, Spearman correlation with first-order taylor ({c['taylor_batches']} "
            f"batches), mean over layers: zo-taylor ({c['zo_directions']} directions) "
            f"{c['spearman_zo_taylor_vs_taylor']:.3f}, l1 {c['spearman_l1_vs_taylor']:.3f}.",
        ]
    return "\n".join([*lines, *_merged(r.get("merged"))])


def _own_starts(runs: dict) -> list[str]:
    """Arms that recorded the one-shot start they trained from (its calibration text is sampled per run)."""
    own = [
        f"{name} {f(run['start']['wikitext2_ppl'])} / {f(run['start']['gsm8k_answer_ppl'], 3)}"
        for name, run in runs.items()
        if run.get("start")
    ]
    return (
        ["", f"Start of each arm that recorded its own (WikiText-2 / GSM8K answers): {'; '.join(own)}."] if own else []
    )


def _merged(merged: dict | None, cpus: dict | None = None, cpu: dict | None = None) -> list[str]:
    if not merged:
        return []
    by_commit: dict[str, list[str]] = {}
    for arm, commit in merged.items():
        by_commit.setdefault(commit[:12], []).append(arm)
    runs = "; ".join(f"{', '.join(arms)} at commit {commit}" for commit, arms in by_commit.items())
    by_cpu: dict[str, list[str]] = {}
    for arm, c in (cpus or {}).items():
        if c != cpu:
            by_cpu.setdefault(_cpu_words(c), []).append(arm)
    others = [f"Measured on {words}, unlike this run: {', '.join(arms)}." for words, arms in by_cpu.items()]
    return ["", f"Arms merged from an earlier run with the same settings: {runs}.", *others]


def _interleaved_speed(speed: dict | None) -> list[str]:
    if not speed:
        return []
    costs = ", ".join(f"{k} {v:.2f}x" for k, v in speed["step_cost_vs_fixed"].items() if k != "fixed")
    return [
        "",
        f"Step cost against the fixed-mask loop in alternating short runs ({speed['rounds']} rounds of "
        f"{speed['steps_per_run']} steps, a mask update every {speed['mask_every']}): {costs}.",
    ]


def gsm8k(r: dict) -> str:
    s, h, a, g = r["sparsefit"], r["harness"], r["answer_ppl"], r["agreement"]
    return "\n".join(
        [
            f"{r['model']}, first {r['rows']} test rows, {r['num_fewshot']}-shot, chat template {r['chat']}.",
            "",
            table(
                ["scorer", "strict match", "flexible match"],
                [
                    [
                        "sparsefit",
                        f"{f(s['strict_match'], 3)} ± {f(s['strict_match_stderr'], 3)}",
                        f"{f(s['flexible_match'], 3)} ± {f(s['flexible_match_stderr'], 3)}",
                    ],
                    ["lm-evaluation-harness", f(h["strict_match"], 3), f(h["flexible_match"], 3)],
                ],
            ),  # fmt: skip
            "",
            f"Per-row agreement: {g['same_generation']}/{g['rows']} identical generations, "
            f"{g['same_strict_verdict']}/{g['rows']} strict and {g['same_flexible_verdict']}/{g['rows']} "
            f"flexible verdicts. Answer perplexity (teacher-forced): {f(a['ppl'], 3)}.",
        ]
    )


def reconstruct_error(r: dict) -> str:
    summary = r["summary_loss_ratio"]
    columns = list(next(iter(summary.values())))
    rows = [[name, *(f(v[c], 3) for c in columns)] for name, v in summary.items()]
    return "\n".join(
        [
            f"{r['model']}, calibration {r['calibration']}, blocks {r['blocks']}. Layer loss after the refit "
            "relative to the method's own weights (lower is better); `cgN`: N conjugate-gradient steps, "
            "`-r0` without the warm start, `exact`: the per-row solve.",
            "",
            table(["method", *columns], rows),
        ]
    )


def reference_llmcompressor(r: dict) -> str:
    rows = []
    for name, run in r["runs"].items():
        for tool in ("llmcompressor", "sparsefit"):
            t = run[tool]
            rows.append([name, tool, f(t["ppl"]), f(t["seconds"], 0), f(t["peak_rss_mb"], 0)])
    return "\n".join(
        [
            f"{r['model']}, seed {r['seed']}, {r['calibration']}; sparsefit with the settings of the time "
            "(two-pass order, no refit).",
            "",
            table(["run", "tool", "WikiText-2 ppl", "seconds", "peak RSS MB"], rows),
        ]
    )


def sparse24_gpu(r: dict) -> str:
    kernels = list(r["per_linear"][0]["ms"]) if r["per_linear"] else []
    rows = [
        [x["set"], x["layer"], f"{x['out']}x{x['in']}", x["tokens"], *(f(x["ms"].get(k), 3) for k in kernels),
         f(x["fp8_24_speedup_vs_fp8_dense"]), f(x.get("fp8_24_gemm_speedup_vs_fp8_dense_gemm")),
         f(x["bf16_24_speedup_vs_bf16_dense"])]
        for x in r["per_linear"]
    ]  # fmt: skip
    header = [
        "set", "layer", "out x in", "tokens", *(f"{k} ms" for k in kernels), "fp8 2:4 vs fp8",
        "fp8 2:4 vs fp8 (GEMM alone)", "bf16 2:4 vs bf16",
    ]  # fmt: skip
    args = r["args"]
    sets = args.get("sets", ["llama-3-8b", "builtin"])
    earlier_rows = sum(x["set"] not in sets for x in r["per_linear"])  # kept from earlier runs (--append)
    planned = len(sets) * len(args.get("layers") or range(4)) * len(args["tokens"]) + earlier_rows
    timing = ("CUDA graph replays" if args.get("graphs") else "eager calls") + f", {args.get('reps', 1)} back to back"
    fused = args.get("compile") and args.get("compile_linears", True)
    timing += "; FP8 linears " + ("compiled" if fused else "eager, their activations' quantization unfused")
    notes = sorted({f"{k}: {v}" for x in r["per_linear"] for k, v in x.get("notes", {}).items()})
    parts = [
        f"Per linear ({timing}, median ms per call; ratios above 1: 2:4 is faster), "
        f"{len(r['per_linear'])} of the {planned} rows the run's arguments ask for:",
        "",
        table(header, rows),
    ]
    if notes:
        parts += ["", "Kernels not measured as asked: " + "; ".join(notes) + "."]
    for model, p in r.get("prefill", {}).items():
        cells = [
            [k, f(p[k]["ms"], 1), f(p[k].get("tokens_per_second"), 0), f(p[k]["speedup_vs_bf16_dense"]),
             p[k].get("failed") or p[k].get("compiled_blocks", "")]
            for k in ("bf16-dense", "fp8-dense", "fp8-2:4", "bf16-2:4")
            if k in p  # a run cut short has measured only the first kernels
        ]  # fmt: skip
        header = ["kernel", "ms", "tokens/s", "vs bf16 dense", "compiled blocks / failure"]
        parts += ["", f"Prefill of {model}:", "", table(header, cells)]
    if not r.get("prefill"):
        parts += ["", "No prefill was measured in this run."]
    for run in r.get("earlier_runs", []):
        measured = ", ".join(run["args"]["sets"]) + "; prefill " + (", ".join(run["args"]["prefill_models"]) or "none")
        parts += ["", f"Rows of an earlier run kept by `--append` (it measured {measured}):", environment_line(run)]
    return "\n".join(parts)


def runtime(r: dict) -> str:
    flags = ", ".join(r.get("cpu_flags", []))
    out = [f"Kernel path {r['kernel_isa']}, {r['threads']} threads; DRAM read bandwidth measured in the run: "
           f"{f(r['dram_read_gbps'], 1)} GB/s. CPU flags: {flags}.", ""]  # fmt: skip
    if "linears_summary" in r:
        out += ["Per linear, Llama-2-7B shapes (geomean over 4096x4096, 11008x4096, 4096x11008), each call on a "
                "different copy of the weight (a rotation larger than the L3): speed against torch's best dense "
                "(fp32 or bf16) and against fp32; the fraction of the bandwidth floor reached; bytes against the "
                "dense bf16 weight.", ""]  # fmt: skip
        rows = [[k.removeprefix("7b_"), f(v["vs_torch_best"]), f(v["vs_torch_fp32"]), f(v["floor_fraction"]),
                 f(v["bytes_vs_dense_bf16"])] for k, v in r["linears_summary"].items()]  # fmt: skip
        out += [table(["sparsity, values, batch", "x torch best", "x torch fp32", "of floor", "bytes"], rows), ""]
        rows = [[f"{x['shape'][0]}x{x['shape'][1]}", x["batch"], f"{x['sparsity']:.0%}", x["values"],
                 f(x["seconds"] * 1e6, 1), f(x["gbps"], 1), f(x["vs_torch_best"]), f(x["vs_torch_fp32"])]
                for x in r["linears"] if x["batch"] in (1, 8, 16)]  # fmt: skip
        out += ["<details><summary>every linear (batch 1, 8 and 16)</summary>", "",
                table(["shape", "batch", "sparsity", "values", "us", "GB/s", "x torch best", "x fp32"], rows),
                "", "</details>", ""]  # fmt: skip
    if "isas" in r:
        keys = sorted({k for v in r["isas"].values() for k in v})
        rows = [[k.removeprefix("7b_"), *(f(r["isas"][isa].get(k, {}).get("vs_torch_best")) for isa in r["isas"])]
                for k in keys]  # fmt: skip
        out += ["Every kernel row this CPU runs, same shapes (geomean), speed against torch's best dense in the "
                "same run:", "", table(["sparsity, values, batch", *r["isas"]], rows), ""]  # fmt: skip
    if "crossover" in r:
        rows = [[x["values"], f(x["density"]), f(x["bitmask_vs_dense"])] for x in r["crossover"]]
        out += ["Bitmask layout against the packed dense layout near full density (4096x11008, batch 1):", "",
                table(["values", "density", "bitmask speed / dense"], rows), ""]  # fmt: skip
    e2e = r.get("end_to_end")
    if e2e:
        out += [f"End to end, builtin model ({e2e['pruning']} pruning), {e2e['new_tokens']} new tokens:", ""]
        rows = [[k, f(v["decode_tokens_per_s"], 1), f(v["prefill_tokens_per_s"], 0), f(v["weight_bytes"] / 2**20, 0)]
                for k, v in e2e["sparsefit"].items()]  # fmt: skip
        rows += [[f"transformers generate {k} b1", f(v["decode_tokens_per_s"], 1), "-", "-"]
                 for k, v in e2e["transformers"].items()]  # fmt: skip
        if isinstance(e2e["llama_cpp"], dict):
            rows += [[f"llama.cpp {k} b1 (dense)", f(v["decode_tokens_per_s"], 1), f(v["prefill_tokens_per_s"], 0), "-"]
                     for k, v in e2e["llama_cpp"].items()]  # fmt: skip
        else:
            out += [f"llama.cpp: {e2e['llama_cpp']}", ""]
        out += [table(["run", "decode tok/s", "prefill tok/s", "weights MiB"], rows), ""]
        ratio_keys = sorted({k for v in e2e["decode_ratios_batch1"].values() for k in v})
        rows = [[k, *(f(v.get(c)) for c in ratio_keys)] for k, v in e2e["decode_ratios_batch1"].items()]
        out += ["Batch-1 decode ratios:", "", table(["run", *ratio_keys], rows), ""]
    layers = r.get("layers_7b")
    if layers:
        rows = [[k, f(v["ms_per_layer"]), f(v["vs_torch_fp32"])] for k, v in layers.items() if isinstance(v, dict)]
        head = ["run", "ms per layer", "x torch fp32"]
        out += [f"Llama-2-7B-shaped decoder layers ({layers['layers']}, random weights), batch-1 decode after "
                f"{layers['context_tokens']} tokens:", "", table(head, rows)]  # fmt: skip
    return "\n".join(out)


def fuzz(r: dict) -> str:
    c = r["cases"]
    return (
        f"The readers' fuzz test (`tests/test_fuzz_readers.py`: mutated safetensors checkpoints, bitmask "
        f"parts, row-adapter and SLoRB side files, wrongly typed recipe fields) at {r['scale']}x the cases "
        f"CI runs, on fresh random draws: {c['passing']} cases passed (a correct load or one clean error, "
        f"peak memory within the bound), {c['failing']} failed, {c['invalid']} draws rejected by the "
        f"strategies; {r['seconds']:.0f} s; pytest: {r['pytest_summary']}."
    )


def moe_calibration(r: dict) -> str:
    a, t, runs = r["args"], r["train"], r["runs"]
    rows = [
        [
            name,
            f(run["ppl"], 3),
            f(run.get("measured"), 4) if "measured" in run else "-",
            run.get("starved_experts", "-"),
        ]
        for name, run in runs.items()
    ]
    share = max(max(block) for block in r["routing_share"])
    return "\n".join(
        [
            f"Tiny Mixtral layout ({t['params'] / 1e6:.1f}M parameters, 8 experts, 2 per token) trained "
            f"{t['steps']} steps on GSM8K train (busiest expert takes {share:.0%} of a block's routed slots on "
            f"test text); pruned to 50% with {a['calib_samples']} calibration windows of {a['seq_len']} tokens; "
            f"perplexity over {a['eval_windows']} GSM8K test windows. `routed`: each expert's statistics from "
            "its routed tokens (default); `all`: from every token. Starved: expert matrices with fewer than "
            "16 routed tokens, pruned by magnitude.",
            "",
            table(["run", "GSM8K test ppl", "measured sparsity", "starved expert matrices"], rows),
        ]
    )


def serve(r: dict) -> str:
    out = [
        f"Streaming completions, {r['args']['max_tokens']} tokens each (greedy, EOS ignored), client-side times.",
        "",
    ]
    # the reference, llama.cpp's llama-server under the same load, is a row of its own when it ran
    reference = r.get("llama_server")
    servers = dict(r["models"])
    if isinstance(reference, dict):
        servers[f"llama-server ({Path(reference['gguf']).name})"] = reference
    rows = []
    for name, m in servers.items():
        for lv in m["levels"]:
            rows.append([name, lv["concurrency"], lv["requests"], lv["failed"], f(lv["decode_tokens_per_s"], 1),
                         f(lv["ttft_p50"] * 1e3, 0), f(lv["itl_p50"] * 1e3, 1), f(lv["itl_p99"] * 1e3, 1)])  # fmt: skip
    head = ["model", "concurrency", "requests", "failed", "decode tok/s", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms"]
    out += [table(head, rows), ""]
    rows = [[n, f(m["decode_speedup_top_vs_1"]), f(m["itl_p99_top_vs_1"])] for n, m in servers.items()]
    out += [table(["model", "decode tok/s, top vs 1 stream", "ITL p99, top vs 1 stream"], rows), ""]
    out.append(f"llama-server: {reference}" if isinstance(reference, str) else "")
    return "\n".join(out)


def gguf(r: dict) -> str:
    if isinstance(r.get("llama_cpp"), str):
        return r["llama_cpp"]
    a = r["args"]
    out = [
        f"{a['model']}, llama-perplexity on WikiText-2 test, context 512, first {a['chunks']} chunks, "
        f"{a['threads']} threads. sparsefit's GGUF vs llama.cpp's convert_hf_to_gguf.py (+ llama-quantize) "
        "of the same checkpoint; revived: pruned weights that read back nonzero from the file.",
        "",
    ]
    rows = []
    for name, m in r["models"].items():
        for t, row in m["formats"].items():
            if isinstance(row, str):
                rows.append([name, t, row, "", "", "", "", ""])
                continue
            ours, theirs = row["sparsefit"], row.get("llama_cpp", {})
            rows.append([name, t, f(ours.get("ppl"), 3), f(theirs.get("ppl"), 3), f(row.get("ppl_ratio"), 4),
                         f"{ours['revived']} / {ours['pruned_weights']}",
                         f"{theirs['revived']} / {theirs['pruned_weights']}" if theirs else "-",
                         f(row["bytes"] / 2**20, 1)])  # fmt: skip
    head = ["model", "type", "ppl sparsefit", "ppl llama.cpp", "ratio", "revived sparsefit", "revived llama.cpp",
            "MiB"]  # fmt: skip
    out += [table(head, rows), ""]
    if r.get("max_ppl_deviation") is not None:
        out.append(f"Largest perplexity deviation from llama.cpp's own files: {100 * r['max_ppl_deviation']:.2f}%.")
    return "\n".join(out)


def scale(r: dict) -> str:
    c = r["calibration"]
    out = [
        f"Random-weight bf16 checkpoints of 8B-class shapes cut to a few decoder layers, pruned by `sparsefit prune "
        f"--method sparsegpt --sparsity 0.5 --dtype bfloat16 --offload-dir` (default best preset) in a child "
        f"process; calibration {c['samples']} x {c['seq_len']} GSM8K tokens. Bound: one block's weights in fp32 "
        "+ its Hessians + the calibration activations (fp32) + 1 GiB. Peak RSS is the child's ru_maxrss (mapped "
        "checkpoint pages included); anonymous is the sampled peak of its RssAnon. Full depth: seconds = fixed + "
        "32 x per block; peak = the measured one. The machine was shared: the load average is given.",
        "",
    ]
    rows = []
    for name, m in r["models"].items():
        run, b = m["run"], m["bound"]
        if run["exit_code"]:
            rows.append([name, m["layers"], f"failed (exit {run['exit_code']})", *[""] * 7])
            continue
        full = m["full_depth"]
        rows.append([
            name, m["layers"], f(run["sparsity_overall"], 4), " / ".join(f(s, 0) for s in run["block_seconds"]),
            f(b["total_mib"] / 1024, 1), f(b["peak_rss_mib"] / 1024, 1), f(b["anon_peak_mib"] / 1024, 1),
            "met" if b["met"] else "missed", f(full["hours"], 1),
            " -> ".join(f(x, 1) for x in run["load_average_1min_before_after"]),
        ])  # fmt: skip
    head = ["shape", "layers", "sparsity", "s per block", "bound GiB", "peak RSS GiB", "anon peak GiB", "bound",
            "32 layers, h", "load avg"]  # fmt: skip
    out.append(table(head, rows))
    return "\n".join(out)


RENDER: dict[str, Callable[[dict], str]] = {
    "quick": quick,
    "oneshot": oneshot,
    "oneshot_avx2": oneshot,
    "calibration": calibration,
    "quantize": quantize,
    "generation": generation,
    "checkpoint_overhead": checkpoint_overhead,
    "recovery": recovery,
    "adaptive": adaptive,
    "adapters": adapters,
    "adapters_150k": adapters,
    "adaptive_lr4e-4": adaptive,
    "adaptive_300k": adaptive,
    "adaptive_damp3": adaptive,
    "gsm8k": gsm8k,
    "reconstruct_error": reconstruct_error,
    "reference_llmcompressor": reference_llmcompressor,
    "sparse24_gpu": sparse24_gpu,
    "runtime": runtime,
    "serve": serve,
    "moe_calibration": moe_calibration,
    "fuzz": fuzz,
    "gguf": gguf,
    "scale": scale,
}


def render(reference: str) -> str:
    """benchmarks/README.md, every result's age counted to the `reference` commit."""
    stems = sorted(p.stem for p in RESULTS.glob("*.json"))
    unknown = [s for s in stems if s not in RENDER]
    if unknown:
        raise SystemExit(f"no renderer for {', '.join(unknown)}: add one to benchmarks/report.py or delete the file")
    results = {stem: json.loads((RESULTS / f"{stem}.json").read_text()) for stem in stems}
    ages = {stem: age(r, reference) for stem, r in results.items()}
    parts = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/` (one current JSON per "
        "benchmark; git history keeps the earlier ones). Each script's docstring says how to run it; run "
        "benchmarks alone on the machine. Times are ratios to a yardstick measured in the same run. "
        f"Ages are counted in commits to {reference[:12]}, the commit this page was generated at.",
    ]
    waiting = sorted({script for stem, script in SCRIPTS.items() if stem not in stems} - {SCRIPTS[s] for s in stems})
    if waiting:
        parts += ["", "Not measured yet: " + ", ".join(f"`benchmarks/{s}` ({docstring_summary(s)})" for s in waiting)]
    parts += ["", *rerun_section(results, ages)]
    for stem in sorted(stems, key=list(RENDER).index):
        result, script = results[stem], SCRIPTS[stem]
        parts += [
            "",
            f"## {stem} (`benchmarks/{script}`)",
            "",
            docstring_summary(script),
            "",
            environment_line(result) + " " + age_line(ages[stem], reference, needs_gpu(result)),
            "",
            RENDER[stem](result),
        ]
    return "\n".join(parts) + "\n"


def to_rerun(results: dict, ages: dict) -> list[tuple[str, str]]:
    """(stem, why) of every result that is untraceable or more than STALE_AFTER commits behind."""
    out = []
    for stem in sorted(results):
        a = ages[stem]
        if a["problem"]:
            out.append((stem, a["problem"]))
        elif a["behind"] > STALE_AFTER:
            gpu = "; needs a GPU" if needs_gpu(results[stem]) else ""
            out.append((stem, f"stale (over {STALE_AFTER} commits behind){gpu}"))
    return out


def blocking(results: dict, ages: dict) -> list[str]:
    """The results `--strict` refuses, each with why: every one to re-run but a stale one that needs
    a GPU, which this (CPU) machine cannot refresh and whose row says so."""
    out = []
    for stem, _ in to_rerun(results, ages):
        a = ages[stem]
        if a["problem"]:
            out.append(f"{stem} ({a['problem']})")
        elif not needs_gpu(results[stem]):
            out.append(f"{stem} ({a['behind']} commits behind)")
    return out


def _measured(result: dict) -> str:
    """When and on what a result was measured, for the re-run table ("-" where it does not say)."""
    env = result.get("environment") or {}
    cpu = env.get("cpu")
    where = _cpu_words(cpu) if cpu else "CPU not recorded"
    device = env.get("device", "cpu")
    where += "" if str(device).startswith("cpu") else f", {device}"
    return f"{env.get('date') or 'date not recorded'}; {where}"


def rerun_section(results: dict, ages: dict) -> list[str]:
    rows = to_rerun(results, ages)
    if not rows:
        return ["## To re-run", "", f"Every result is traceable and at most {STALE_AFTER} commits behind."]
    return [
        "## To re-run",
        "",
        f"Results that are untraceable or more than {STALE_AFTER} commits behind, when and where each was "
        "measured, and the command that measures it again (from the repository root, on a quiet machine):",
        "",
        table(
            ["result", "why", "commits behind", "measured", "command"],
            [
                [
                    f"`{stem}`",
                    why,
                    "-" if ages[stem]["behind"] is None else ages[stem]["behind"],
                    _measured(results[stem]),
                    f"`{RERUN[stem]}`",
                ]
                for stem, why in rows
            ],
        ),  # fmt: skip
    ]


_REFERENCE = re.compile(r"Ages are counted in commits to ([0-9a-f]{7,40}), the commit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if benchmarks/README.md is out of date")
    parser.add_argument(
        "--strict",
        action="store_true",
        help=f"exit 1 while a result is untraceable or over {STALE_AFTER} commits behind",
    )
    args = parser.parse_args()
    head = resolve("HEAD")
    if args.check:
        # Count to the commit the README names, so that later commits alone do not outdate it.
        found = _REFERENCE.search(README.read_text()) if README.exists() else None
        reference = resolve(found.group(1)) if found else None
        if reference is None:
            sys.exit(
                "benchmarks/README.md names no commit of this history to count ages to: run python benchmarks/report.py"
            )
    elif head is None:
        sys.exit("benchmarks/report.py counts each result's age with git: run it inside the repository")
    else:
        reference = head
    text = render(reference)
    if args.strict:
        results = {p.stem: json.loads(p.read_text()) for p in RESULTS.glob("*.json")}
        bad = blocking(results, {stem: age(r, reference) for stem, r in results.items()})
        if bad:
            sys.exit(f"results to re-run (untraceable, or over {STALE_AFTER} commits behind): " + "; ".join(bad))
    if args.check:
        if not README.exists() or README.read_text() != text:
            sys.exit("benchmarks/README.md is out of date: run python benchmarks/report.py")
        return
    README.write_text(text)
    print(f"wrote {README}")


if __name__ == "__main__":
    main()
