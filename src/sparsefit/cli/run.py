"""`sparsefit run`, `report` and `recipes`: staged recipes and the reports of their run directories."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_run(args: argparse.Namespace) -> int:
    from sparsefit.models.offload import reuse_freed_memory
    from sparsefit.recipes import load_recipe, run_recipe
    from sparsefit.recipes.report import format_table

    recipe = load_recipe(args.recipe, args.set or [], args.model)
    if getattr(args, "report_to", None) is not None:  # the flag wins over the recipe's key and its stages' own
        recipe = recipe.with_tracker(args.report_to)
    if args.check:
        print(f"recipe {recipe.name}: {len(recipe.stages)} stages on {recipe.model}")
        for i, stage in enumerate(recipe.stages):
            fields = stage.model_dump(exclude_defaults=True, exclude={"kind", "name"})
            print(f"  {i + 1:02d}-{stage.name} ({stage.kind}) {fields}")
        for note in recipe.notes:
            print(f"  note: {note}")
        return 0
    output = args.output or str(Path("runs") / recipe.name)  # the name is a plain folder name (validated)
    if any(stage.kind == "finetune" for stage in recipe.stages):
        reuse_freed_memory()
    report = run_recipe(recipe, output, args.device)
    print(format_table(report["stages"], markdown=False))
    print(f"report: {Path(output) / 'report.md'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sparsefit.recipes import read_report
    from sparsefit.recipes.report import format_table

    report = read_report(args.run_dir)
    print(format_table(report["stages"], markdown=False))
    if report["baseline"]:
        print(f"recovery = metric / baseline '{report['baseline']['stage']}' (perplexities: above 1 is worse)")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from sparsefit.recipes import builtin_recipes, load_recipe

    for name in sorted(builtin_recipes()):
        recipe = load_recipe(name)
        kinds = " -> ".join(s.kind for s in recipe.stages)
        print(f"{name:14s} {recipe.description.split('.')[0]}.\n{'':14s} [{kinds}]")
    return 0


def register(sub: argparse._SubParsersAction, parents: list, only: str | None) -> None:
    """The `run`, `report` and `recipes` commands."""
    p = sub.add_parser(
        "run", help="run a recipe (builtin name or YAML, native or SparseML) into a run directory", parents=parents
    )
    p.add_argument("recipe", help="builtin recipe name (see `sparsefit recipes`) or a YAML file")
    p.add_argument("--output", default=None, help="run directory (default runs/<recipe name>)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", help="variable or STAGE.FIELD override")
    p.add_argument("--model", default=None, help="replace the recipe's model")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    p.add_argument("--check", action="store_true", help="validate and print the stages, run nothing")
    if only in (None, "run"):
        from sparsefit.config import add_flags
        from sparsefit.training import FinetuneConfig

        add_flags(p, FinetuneConfig, ["report_to"])  # for every finetune stage
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="print the report table of a run directory", parents=parents)
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("recipes", help="list builtin recipes", parents=parents)
    p.set_defaults(func=cmd_recipes)
