"""`sparsefit prune` and `sparsefit quantize`: the layer-by-layer commands (one-shot pruning,
GPTQ / round-to-nearest quantization) that share calibration and the block-by-block driver."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparsefit.cli.common import OVERWRITE_HELP, add_model_args, write_json
from sparsefit.config import add_flags, flag_values
from sparsefit.errors import UsageError

# The config fields that are flags, in --help order (each flag's type, default and help come from its field).
PRUNE_FIELDS = [
    "preset", "method", "sparsity", "structure", "owl_m", "owl_lambda", "targets", "ignore", "calib", "calib_split",
    "text_field", "num_samples", "self_mix", "seq_len", "seed", "batch_size", "block_size", "damp", "magnitude_scope",
    "preserve_mask", "reconstruct_iters", "sequential", "compute_dtype", "offload_dir", "min_expert_tokens",
    "expert_calibration",
]  # fmt: skip
QUANTIZE_FIELDS = [
    "scheme", "method", "group_size", "export_dtype", "sparse_format", "targets", "ignore", "calib", "calib_split",
    "text_field", "num_samples", "self_mix", "seq_len", "seed", "batch_size", "actorder", "observer", "block_size",
    "damp", "sequential", "compute_dtype", "min_expert_tokens",
]  # fmt: skip


def _profile_arg(value: str | None) -> str | dict | None:
    """`uniform`, `owl`, or a .json/.yaml file mapping layer-name regexes to sparsities."""
    if value is None or value in ("uniform", "owl"):
        return value
    from sparsefit.config import load_yaml

    path = Path(value)
    if path.suffix not in (".json", ".yaml", ".yml") or not path.is_file():
        raise UsageError(f"--profile '{value}' is neither uniform, owl, nor an existing .json/.yaml mapping file")
    mapping = load_yaml(path, "--profile file")  # YAML is a superset of JSON
    if not isinstance(mapping, dict) or not mapping:
        raise UsageError(f"--profile file '{value}' must map layer-name regexes to sparsities, e.g. 'mlp': 0.6")
    return mapping


def _layerwise_setup(args: argparse.Namespace, config_cls: type, fields: list[str], extra: dict | None = None):  # noqa: ANN202
    """What `prune` and `quantize` share: the validated config (from the flags given), the compute
    device, the claimed output, and the model and tokenizer, loaded on the CPU (the layer-by-layer
    driver moves one block at a time to the compute device)."""
    from sparsefit.config import validate
    from sparsefit.models import load_model_and_tokenizer, parse_device
    from sparsefit.outputs import check_writable_file, claim_output

    options = {**flag_values(args, fields), **(extra or {})}  # unset flags keep the config's defaults
    if args.calib == "none":
        options["calib"] = None
    config = validate(config_cls, options, f"{args.command} options", as_flags=True)
    device = parse_device(args.device)
    check_writable_file(args.json, "--json", args.output, (args.model,))
    claim = claim_output(args.output, overwrite=args.overwrite, inputs=(args.model,))
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, "cpu", args.trust_remote_code)
    return config, device, claim, model, tokenizer


def describe_sparsity(summary: dict) -> str:
    """One line: the measured sparsity by kind of block matrix, and what it does not count."""
    kinds = ", ".join(f"{k} {v['sparsity']:.3f}" for k, v in summary["per_kind"].items())
    excluded = sorted(set(summary["excluded"].values()))
    return f"  over {summary['weights']} block weights, by kind: {kinds}; not counted: {'; '.join(excluded)}"


def cmd_prune(args: argparse.Namespace) -> int:
    from sparsefit.export import save_checkpoint
    from sparsefit.pruning import OneShotConfig, oneshot
    from sparsefit.pruning.oneshot import peak_rss_mb

    profile = {} if args.profile is None else {"profile": _profile_arg(args.profile)}
    config, device, claim, model, tokenizer = _layerwise_setup(args, OneShotConfig, PRUNE_FIELDS, profile)
    report = oneshot(model, tokenizer, config, device=device)
    report.model = args.model
    save_checkpoint(model, tokenizer, claim.path, {"pruning": report.to_json()})
    # `peak_rss_mb` is the pruning's; the save reads every weight back, so the process's peak may be later.
    report.process_peak_rss_mb = peak_rss_mb()
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in report.phases.items())
    profile = config.profile if isinstance(config.profile, str) else "explicit"
    print(
        f"pruned {args.model} with {config.method} ({report.structure}, {profile}): "
        f"sparsity {report.sparsity.overall:.4f} in {report.seconds:.1f} s ({phases}); "
        f"peak RSS {report.peak_rss_mb:.0f} MB -> {args.output}"
    )
    print(describe_sparsity(report.sparsity.model_dump()))
    if report.sparsity.starved_experts:
        starved = report.sparsity.starved_experts
        print(
            f"{len(starved)} expert matrices got fewer than {config.min_expert_tokens} calibration tokens and were "
            f"pruned by magnitude: {', '.join(f'{n} ({t})' for n, t in list(starved.items())[:6])}"
            + (" ..." if len(starved) > 6 else "")
        )
    write_json(report.to_json(), args.json)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from sparsefit.export.compressed import FORMATS, save_quantized
    from sparsefit.pruning.oneshot import peak_rss_mb
    from sparsefit.quantization import QuantizeConfig, quantize

    config, device, claim, model, tokenizer = _layerwise_setup(args, QuantizeConfig, QUANTIZE_FIELDS)
    result = quantize(model, tokenizer, config, device=device)
    result.report.model = args.model
    info = save_quantized(model, tokenizer, claim.path, result)
    result.report.process_peak_rss_mb = peak_rss_mb()
    r = result.report
    print(
        f"quantized {args.model} to {config.scheme} with {config.method} in {r.seconds:.1f} s: {r.layers} layers, "
        f"sparsity {r.sparsity_before:.4f} -> {r.sparsity_after:.4f}, {r.revived_weights} pruned weights revived; "
        f"{FORMATS[config.scheme]}, {info['weight_bytes'] / 2**20:.1f} MiB of weights "
        f"({info['ratio_to_dense_bf16']:.2f}x dense bf16) -> {args.output}"
    )
    if r.not_quantized:
        print(f"  not quantized (stored as floats): {', '.join(r.not_quantized)}")
    if "experts.safetensors" in info["files"]:
        print("  expert tensors: codes and scales in experts.safetensors (sparsefit's own file; other loaders lack it)")
    if r.starved_experts:
        print(
            f"  {len(r.starved_experts)} expert matrices got fewer than {config.min_expert_tokens} calibration tokens "
            f"and were rounded to nearest: {', '.join(f'{n} ({t})' for n, t in list(r.starved_experts.items())[:6])}"
            + (" ..." if len(r.starved_experts) > 6 else "")
        )
    write_json({**r.to_json(), "export": info}, args.json)
    return 0


def register(sub: argparse._SubParsersAction, parents: list, only: str | None) -> None:
    """The `prune` and `quantize` commands and their flags (derived from the configs when `only` is one of them)."""
    p = sub.add_parser("prune", help="one-shot pruning (magnitude, wanda, sparsegpt)", parents=parents)
    add_model_args(p)
    if only in (None, "prune"):
        from sparsefit.pruning import OneShotConfig

        add_flags(p, OneShotConfig, PRUNE_FIELDS[:4])
        p.add_argument("--profile", default=None, help=OneShotConfig.model_fields["profile"].description)
        add_flags(p, OneShotConfig, PRUNE_FIELDS[4:])
    p.add_argument("--output", required=True, help="directory for the pruned HF checkpoint")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "quantize",
        help="quantize (GPTQ or round-to-nearest), pruned weights kept zero; compressed export",
        parents=parents,
    )
    add_model_args(p)
    if only in (None, "quantize"):
        from sparsefit.quantization.config import QuantizeConfig

        add_flags(p, QuantizeConfig, QUANTIZE_FIELDS)
    p.add_argument("--output", required=True, help="directory for the compressed-tensors checkpoint")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--json", default=None, help="write the report (with the export's files and sizes) as JSON here")
    p.set_defaults(func=cmd_quantize)
