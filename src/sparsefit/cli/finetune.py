"""`sparsefit finetune`: dense or sparse fine-tuning, distillation, gradual / iterative pruning,
adaptive sparse training and adapters; the flags come from the training configs."""

from __future__ import annotations

import argparse
import os

from sparsefit.cli.common import OVERWRITE_HELP, add_model_args, float_list, write_json
from sparsefit.config import add_flags, flag_values
from sparsefit.errors import UsageError

FINETUNE_GROUPS = {
    "data": ["dataset", "self_samples", "self_mix", "split", "format", "text_field", "seq_len", "limit"],
    "length (one of)": ["max_steps", "num_epochs", "max_tokens"],
    "optimization": [
        "batch_size",
        "grad_accum",
        "lr",
        "weight_decay",
        "warmup_steps",
        "scheduler",
        "max_grad_norm",
        "bf16",
        "gradient_checkpointing",
        "strategy",
        "seed",
    ],  # fmt: skip
    "checkpoints": ["checkpoint_every", "checkpoint_minutes", "keep_checkpoints"],
    "tracking": ["report_to"],
    "sparsity": ["method", "masks", "targets", "ignore", "peft"],
    "distillation": [
        "teacher",
        "ce_weight",
        "kl_weight",
        "square_head_weight",
        "temperature",
        "distill_layers",
        "teacher_dtype",
    ],  # fmt: skip
}

AST_FIELDS = [
    "structure", "mask_every", "mask_metric", "stats_batches", "stats_every", "srste_decay", "increase_steps",
    "pruned_start", "pruned_cap", "slorb", "slorb_k", "slorb_init", "slorb_trainable_projection",
]  # fmt: skip

ADAPTER_FIELDS = [
    "rank", "row_fraction", "row_budget", "criterion", "importance_batches", "zo_directions", "zo_eps", "dropout",
    "lora_alpha", "exclude", "base_bits", "base_group_size", "row_init", "merge",
]  # fmt: skip


def finetune_options(args: argparse.Namespace) -> dict:
    """The finetune flags the user set, as FinetuneConfig fields (unset flags keep the config's defaults)."""
    options = flag_values(args, [name for names in FINETUNE_GROUPS.values() for name in names])
    ast = flag_values(args, AST_FIELDS)
    if ast:
        if options.get("method") != "ast":
            flags = ", ".join("--" + name.replace("_", "-") for name in ast)
            raise UsageError(f"{flags} set options of adaptive sparse training: add --method ast")
        options["ast"] = ast
    adapter = flag_values(args, ADAPTER_FIELDS)
    if adapter:
        if options.get("peft", "none") == "none":
            flags = ", ".join("--" + name.replace("_", "-") for name in adapter)
            raise UsageError(f"{flags} set options of parameter-efficient fine-tuning: add --peft rows or --peft lora")
        options["adapter"] = adapter
    if args.gmp is not None:
        values = float_list(args.gmp, "--gmp")
        if len(values) != 5:
            raise UsageError(f"--gmp takes INITIAL,FINAL,START,END,EVERY, e.g. 0,0.5,0,100,10 (got '{args.gmp}')")
        initial, final, start, end, every = values
        options["gmp"] = {"initial": initial, "final": final, "start": int(start), "end": int(end), "every": int(every)}
    return options


def cmd_finetune(args: argparse.Namespace) -> int:
    from sparsefit.config import validate
    from sparsefit.models import load_model_and_tokenizer, parse_device
    from sparsefit.models.offload import reuse_freed_memory
    from sparsefit.outputs import check_writable_file, claim_output
    from sparsefit.training import FinetuneConfig, finetune, iterative_prune_finetune
    from sparsefit.training.resume import fingerprint_changes, finished_run, options_fingerprint
    from sparsefit.training.trackers import check_tracker

    config = validate(
        FinetuneConfig, finetune_options(args), "finetune options", as_flags=True, flattened=("ast", "adapter")
    )
    check_tracker(config.report_to)  # before the output is claimed or the model loads
    device = parse_device(args.device)
    check_writable_file(args.json, "--json", args.output, (args.model, args.teacher))
    cycles = float_list(args.cycles, "--cycles") if args.cycles else None
    if cycles and not all(0 < c < 1 for c in cycles):
        raise UsageError(f"--cycles takes sparsities in (0, 1), e.g. 0.3,0.5,0.7 (got '{args.cycles}')")
    if args.resume and cycles:
        raise UsageError("--resume continues one fine-tune; iterative --cycles start over (drop --resume)")
    # Checked and locked before the model loads: a second run into the same place fails at once.
    claim = claim_output(args.output, overwrite=args.overwrite, reuse=args.resume, inputs=(args.model, args.teacher))
    done = finished_run(claim.path) if args.resume else None
    if done is not None:
        options = options_fingerprint(args.model, config, int(os.environ.get("WORLD_SIZE", "1")))
        changes = fingerprint_changes({k: done.get("fingerprint", {}).get(k) for k in options}, options)
        if changes:
            raise UsageError(
                f"{args.output} holds a fine-tune that finished with other options ({', '.join(changes)}); "
                "pass --overwrite to train again with these"
            )
        print(f"{args.output} already holds a finished fine-tune ({done['steps']} steps); nothing to resume")
        return 0
    reuse_freed_memory()
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, device, args.trust_remote_code)
    if args.cycles:
        from sparsefit.pruning import OneShotConfig

        prune = validate(
            OneShotConfig,
            {k: v for k, v in {"method": args.cycle_method, "calib": args.calib}.items() if v is not None},
            "prune options",
        )
        records = iterative_prune_finetune(
            model, tokenizer, cycles, prune, config, claim.path, device=device, overwrite=args.overwrite
        )
        for c in records:
            f = c["finetune"]
            print(f"cycle {c['sparsity']:.2f}: final loss {f['final_loss']:.4f}, sparsity {f['sparsity']:.4f}")
        write_json({"cycles": records}, args.json)
        return 0
    metrics = finetune(
        model, tokenizer, config, claim.path, resume=args.resume, device=device, overwrite=args.overwrite
    )
    tps = metrics["tokens_per_second"]
    print(
        f"fine-tuned {args.model}: {metrics['steps']} steps, {metrics['tokens']} tokens"
        f"{f' at {tps:.0f} tok/s' if tps else ''}, final loss {metrics['final_loss']:.4f}, sparsity "
        f"{metrics['sparsity']:.4f}, revived weights {metrics['revived_weights']} -> {args.output}"
    )
    write_json(metrics, args.json)
    return 0


def register(sub: argparse._SubParsersAction, parents: list, only: str | None) -> None:
    """The `finetune` command and its flags (derived from the configs when `only` is it)."""
    p = sub.add_parser(
        "finetune", help="fine-tune (dense or sparse, optionally distilled from a teacher)", parents=parents
    )
    add_model_args(p)
    p.add_argument("--output", required=True, help="directory for the checkpoint, train_log.jsonl and metrics.json")
    p.add_argument("--json", default=None, help="also write the final metrics here")
    p.add_argument("--resume", action="store_true", help="continue from the newest whole checkpoint in OUTPUT")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    for title, names in FINETUNE_GROUPS.items() if only in (None, "finetune") else ():
        from sparsefit.training import FinetuneConfig

        g = p.add_argument_group(title)
        add_flags(g, FinetuneConfig, names)
        if title == "sparsity":
            g.add_argument("--gmp", default=None, help="gradual magnitude pruning INITIAL,FINAL,START,END,EVERY")
            g.add_argument("--cycles", default=None, help="iterative prune/fine-tune cycles, e.g. 0.3,0.5,0.7")
            g.add_argument("--cycle-method", default=None, help="one-shot method of each cycle (default sparsegpt)")
            g.add_argument("--calib", default=None, help="calibration of each cycle (default gsm8k)")
    if only in (None, "finetune"):
        from sparsefit.training.config import AdapterConfig, ASTConfig

        add_flags(p.add_argument_group("adaptive sparse training (--method ast)"), ASTConfig, AST_FIELDS)
        add_flags(p.add_argument_group("adapters (--peft rows | lora)"), AdapterConfig, ADAPTER_FIELDS)
    p.set_defaults(func=cmd_finetune)
