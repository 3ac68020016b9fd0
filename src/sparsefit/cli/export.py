"""`sparsefit export`: any model as a plain or compact checkpoint."""

from __future__ import annotations

import argparse
import sys

from sparsefit.cli.common import OVERWRITE_HELP, add_model_args, write_json


def cmd_export(args: argparse.Namespace) -> int:
    from sparsefit.export import export_checkpoint
    from sparsefit.models import load_model_and_tokenizer
    from sparsefit.outputs import check_writable_file, claim_output

    if args.push_to_hub:
        from sparsefit.export.hub import check_repo_id

        check_repo_id(args.push_to_hub)  # before any work
    check_writable_file(args.json, "--json", args.output, (args.model,))
    claim = claim_output(args.output, overwrite=args.overwrite, inputs=(args.model,))
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, "cpu", args.trust_remote_code)
    info = export_checkpoint(model, tokenizer, claim.path, args.model, args.format, args.slorb, args.row_adapters)
    print(
        f"exported {args.model} as {info['format']}: {len(info['files'])} files, {info['bytes'] / 2**20:.1f} MiB, "
        f"sparsity {info['sparsity']:.4f} -> {args.output}"
    )
    if "gguf" in info:
        g = info["gguf"]
        types = ", ".join(f"{n} {k}" for k, n in sorted(g["tensor_types"].items()))
        print(
            f"  {g['file']}: {types} tensors; pruned weights read back nonzero: {g['revived']} of {g['zero_weights']}"
        )
    if info.get("slorb") in ("dropped", "merged"):
        what = (
            "left out: the export is the N:M model alone"
            if info["slorb"] == "dropped"
            else ("merged into the weights: the export is one plain checkpoint, no longer N:M")
        )
        print(f"notice: the model's SLoRB branches were {what}", file=sys.stderr)
    if args.push_to_hub:
        from sparsefit.export.hub import push_to_hub

        info["pushed"] = push_to_hub(args.output, args.push_to_hub, private=args.private)
        print(f"pushed {args.output} to {args.push_to_hub}: {info['pushed']}")
    write_json(info, args.json)
    return 0


def register(sub: argparse._SubParsersAction, parents: list, only: str | None) -> None:
    """The `export` command."""
    p = sub.add_parser(
        "export",
        help="write a model as a plain HF checkpoint (or compact sparse storage) with sparsity.json",
        parents=parents,
    )
    add_model_args(p)
    p.add_argument(
        "--format",
        default="hf",
        help="hf (default): a plain Hugging Face checkpoint | sparse-bitmask | sparse-24-bitmask: compact "
        "sparse storage in the layouts of compressed-tensors <= 0.14 (sparsefit reads them back) | gguf-f16 | "
        "gguf-bf16 | gguf-q8_0 | gguf-q4_0: one .gguf for llama.cpp / Ollama (Llama architecture) with an "
        "Ollama Modelfile; each keeps pruned weights exactly 0 (K-quants do not, and are refused)",
    )
    p.add_argument(
        "--slorb",
        default="keep",
        choices=["keep", "drop", "merge"],
        help="a model trained with SLoRB branches: keep them beside the weights (default; sparsefit restores "
        "them) | drop them (the N:M model alone) | merge them into dense weights (one plain checkpoint)",
    )
    p.add_argument(
        "--row-adapters",
        default="keep",
        choices=["keep", "merge"],
        help="a model with unmerged row adapters (finetune --merge none): keep them beside the weights (default) "
        "| merge them into the weights (the sparsity is kept)",
    )
    p.add_argument("--output", required=True, help="directory for the exported checkpoint")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--json", default=None, help="write what was exported (files, bytes, sparsity) here")
    p.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO",
        help="then upload OUTPUT (weights, tokenizer, model card README.md) to the hub repository REPO (user/name)",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create REPO as a private repository")
    p.set_defaults(func=cmd_export)
