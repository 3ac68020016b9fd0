"""The run report: `report.json`, `report.md` (one row per stage, recovery against the dense
baseline) and PNG plots (per-layer sparsity, training loss and learning rate, metrics by stage)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from sparsefit.atomic import mark, write_bytes, write_json, write_text
from sparsefit.errors import UsageError
from sparsefit.training.log import read_log

if TYPE_CHECKING:
    from sparsefit.recipes.schema import Recipe

PLOTS = ("sparsity.png", "training.png", "metrics.png")
METRICS = ("self_ppl", "ppl", "answer_ppl", "strict_match", "flexible_match")
COLUMNS = ("stage", "kind", "sparsity", *METRICS, "recovery", "seconds", "tokens_per_second")
HEADERS = {
    "stage": "stage",
    "kind": "kind",
    "sparsity": "sparsity",
    "self_ppl": "self-text ppl",
    "ppl": "wiki ppl",
    "answer_ppl": "gsm8k answer ppl",
    "strict_match": "gsm8k strict",
    "flexible_match": "gsm8k flexible",
    "recovery": "recovery (x baseline)",
    "seconds": "time s",
    "tokens_per_second": "tok/s",
}


def _stage_records(run_dir: Path) -> list[dict]:
    records = []
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name[:2].isdigit()):
        path = folder / "stage.json"
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            valid = isinstance(record, dict) and {"name", "kind", "seconds", "result"} <= set(record)
        except (OSError, ValueError):
            valid = False
        if not valid:
            raise UsageError(f"'{path}' is damaged; rerun the recipe into '{run_dir}' to redo that stage")
        records.append({**record, "folder": folder.name})
    return records


def build_rows(records: list[dict]) -> tuple[list[dict], dict | None]:
    """One row per stage; recovery = metric / baseline metric (above 1 is worse for perplexities)."""
    evals = [r for r in records if r["kind"] == "evaluate"]
    baseline = next((r for r in evals if r["result"].get("baseline")), evals[0] if evals else None)
    rows = []
    for r in records:
        res = r["result"]
        row = {"stage": r["name"], "kind": r["kind"], "seconds": r["seconds"], "folder": r["folder"]}
        row["sparsity"] = res.get("sparsity")
        row["tokens_per_second"] = res.get("tokens_per_second")
        for m in METRICS:
            row[m] = res.get(m)
        if r["kind"] == "evaluate" and baseline is not None:
            base = baseline["result"]
            row["recovery"] = {m: res[m] / base[m] for m in METRICS if res.get(m) is not None and base.get(m)}
        rows.append(row)
    return rows, {"stage": baseline["name"], **baseline["result"]} if baseline else None


def _fmt(value: object, key: str) -> str:
    if value is None:
        return ""
    if key == "recovery":
        return ", ".join(f"{k} {v:.3f}" for k, v in value.items())  # type: ignore[union-attr]
    if key in ("sparsity", "strict_match", "flexible_match"):
        return f"{value:.3f}"
    if key in ("seconds", "tokens_per_second"):
        return f"{value:.0f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_table(rows: list[dict], markdown: bool = True) -> str:
    columns = [c for c in COLUMNS if c in ("stage", "kind") or any(r.get(c) is not None for r in rows)]
    header = [HEADERS[c] for c in columns]
    lines = [[_fmt(r.get(c), c) for c in columns] for r in rows]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])
    widths = [max(len(h), *(len(cells[i]) for cells in lines)) for i, h in enumerate(header)]
    text = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    text += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(text)


def write_report(run_dir: str | Path, recipe: Recipe | None = None) -> dict:
    run_dir = Path(run_dir)
    records = _stage_records(run_dir)
    mark(run_dir, "report.json", "report.md", *PLOTS)  # recorded before they are written
    rows, baseline = build_rows(records)
    plots = _plots(run_dir, records, rows)
    report = {
        "recipe": recipe.name if recipe else None,
        "stages": rows,
        "baseline": baseline,
        "plots": plots,
        "notes": recipe.notes if recipe else [],
    }
    skipped = [
        f"{r['name']}: {task} skipped ({why})" for r in records for task, why in r["result"].get("skipped", {}).items()
    ]
    report["notes"] = [*report["notes"], *skipped]
    write_json(run_dir / "report.json", report)
    md = [f"# sparsefit run: {report['recipe'] or run_dir.name}", "", format_table(rows), ""]
    if baseline:
        md += [
            f"Recovery is metric / metric of the baseline evaluation `{baseline['stage']}` "
            "(for perplexities, above 1 is worse).",
            "",
        ]
    md += [f"![{Path(p).stem}]({p})" for p in plots]
    if report["notes"]:
        md += ["", "## Notes", *[f"- {n}" for n in report["notes"]]]
    write_text(run_dir / "report.md", "\n".join(md) + "\n")
    return report


def read_report(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run directory '{run_dir}' does not exist; pass the --output of `sparsefit run`")
    if not any(True for _ in run_dir.glob("*/stage.json")):
        raise UsageError(f"'{run_dir}' holds no finished stage; run a recipe into it first")
    return write_report(run_dir)


def _plots(run_dir: Path, records: list[dict], rows: list[dict]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: pip install 'sparsefit[plots]'
        return []
    written = []
    model_stages = [r for r in records if r["kind"] in ("oneshot", "finetune", "export")]
    if model_stages:
        info_path = run_dir / model_stages[-1]["folder"] / "sparsity.json"
        per_layer = _per_layer_sparsity(info_path)
        if per_layer:
            fig, ax = plt.subplots(figsize=(10, 3.5))
            kinds = sorted({name.rsplit(".", 1)[-1] for name in per_layer})
            for kind in kinds:
                pts = [(_block(n), s) for n, s in per_layer.items() if n.rsplit(".", 1)[-1] == kind]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1, label=kind)
            ax.set(xlabel="decoder block", ylabel="sparsity", title=f"per-layer sparsity ({model_stages[-1]['name']})")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7, ncol=4)
            written.append(_save(fig, run_dir / "sparsity.png", plt))
    logs = [(r["name"], run_dir / r["folder"] / "train_log.jsonl") for r in records if r["kind"] == "finetune"]
    logs = [(n, p) for n, p in logs if p.is_file()]
    if logs:
        entries = {name: read_log(path, warn=False) for name, path in logs}
        flips = {n: [e for e in log if "mask_flip_rate" in e] for n, log in entries.items()}  # adaptive masks
        flips = {n: f for n, f in flips.items() if f}
        fig, axes = plt.subplots(1, 3 if flips else 2, figsize=(15 if flips else 10, 3.5))
        for name, log in entries.items():
            axes[0].plot([e["step"] for e in log], [e["loss"] for e in log], label=name)
            axes[1].plot([e["step"] for e in log], [e["lr"] for e in log], label=name)
        for name, log in flips.items():
            axes[2].plot([e["step"] for e in log], [e["mask_flip_rate"] for e in log], marker="o", ms=3, label=name)
            axes[2].set(xlabel="step", ylabel="fraction of positions", title="mask flips per update")
        axes[0].set(xlabel="step", ylabel="loss", title="training loss")
        axes[1].set(xlabel="step", ylabel="learning rate", title="learning rate")
        axes[0].legend(fontsize=7)
        written.append(_save(fig, run_dir / "training.png", plt))
    evals = [r for r in rows if r["kind"] == "evaluate"]
    present = [
        m for m in ("self_ppl", "ppl", "answer_ppl", "flexible_match") if any(r.get(m) is not None for r in evals)
    ]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.5), squeeze=False)
        for ax, metric in zip(axes[0], present):
            pts = [(r["stage"], r[metric]) for r in evals if r.get(metric) is not None]
            ax.bar([p[0] for p in pts], [p[1] for p in pts], color="tab:blue")
            ax.set(title=metric, ylabel=metric)
            ax.tick_params(axis="x", rotation=30, labelsize=7)
        written.append(_save(fig, run_dir / "metrics.png", plt))
    return written


def _per_layer_sparsity(path: Path) -> dict[str, float]:
    """`sparsity.per_layer` of a checkpoint's sparsity.json; empty (no plot) when missing or damaged."""
    try:
        per_layer = json.loads(path.read_text())["sparsity"]["per_layer"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    ok = isinstance(per_layer, dict) and all(isinstance(v, (int, float)) for v in per_layer.values())
    return per_layer if ok else {}


def _block(name: str) -> int:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return 0


def _save(fig, path: Path, plt) -> str:  # noqa: ANN001
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, png.getvalue())
    return path.name
