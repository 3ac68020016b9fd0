"""The model card (`README.md`) every checkpoint and export carries: Hugging Face front matter and a
body that states what was done, with only the numbers the run recorded.

The card is rendered from the record written beside the weights (`sparsity.json`: the measured
sparsity plus the metadata of the step that wrote them) and, for an export, the record of the
checkpoint it was exported from. Nothing is estimated: a section whose record is missing is left out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel

from sparsefit.models.builtin import BUILTIN_MODELS

README = "README.md"
# Formats only sparsefit reads back; everything else loads in transformers (compressed-tensors for
# the quantized ones), and GGUF files in llama.cpp and its kin.
SPARSEFIT_ONLY = ("sparse-bitmask", "sparse-24-bitmask")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _plain(value):  # noqa: ANN001, ANN202 - JSON-like values
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def base_model_of(spec: str | None) -> str | None:
    """The hub id a model spec goes back to: a builtin's upstream model, a hub id itself, or what the
    card of a local checkpoint names (None when nothing says)."""
    if not spec:
        return None
    text = str(spec)
    if text in BUILTIN_MODELS:
        return BUILTIN_MODELS[text].hub_id
    path = Path(text).expanduser()
    if path.is_file():
        path = path.parent
    if path.is_dir():
        return front_matter(path / README).get("base_model")
    return text if _HUB_ID.match(text) else None


def front_matter(readme: Path) -> dict:
    """The `key: value` lines of a card's front matter (the scalar ones; {} without a card)."""
    try:
        text = readme.read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return {}
    out = {}
    for line in text[4 : text.index("\n---", 3)].splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith((" ", "-")) and value.strip():
            out[key.strip()] = value.strip().strip("'\"")
    return out


def source_spec(record: dict) -> str | None:
    """The model spec the recorded step started from."""
    for key in ("pruning", "quantization"):
        spec = (_plain(record.get(key)) or {}).get("model")
        if spec:
            return spec
    finetune = _plain(record.get("finetune")) or {}
    return record.get("exported_from") or (finetune.get("config") or {}).get("model")


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a YAML string


def _sections(record: dict) -> list[str]:
    """The body paragraphs for one record (this write's step, or the source's)."""
    out = []
    pruning = _plain(record.get("pruning"))
    if isinstance(pruning, dict) and pruning.get("method"):
        line = f"- **Pruning**: {pruning['method']}, structure {pruning.get('structure', '?')}"
        if pruning.get("target") is not None:
            line += f", target sparsity {_pct(pruning['target'])}"
        calib = pruning.get("calibration") or {}
        if calib.get("sequences"):
            line += (
                f"; calibration: {calib['sequences']} sequences, {calib['tokens']} tokens"
                f" of {calib.get('source') or 'given batches'}"
            )
        out.append(line)
    finetune = _plain(record.get("finetune"))
    if isinstance(finetune, dict) and finetune.get("steps") is not None:
        line = f"- **Fine-tuning**: {finetune.get('method', '?')}, {finetune['steps']} steps"
        line += f", {finetune.get('tokens')} tokens"
        if finetune.get("final_loss") is not None:
            line += f", final training loss {finetune['final_loss']:.4f}"
        line += f"; pruned weights revived: {finetune.get('revived_weights', '?')}"
        out.append(line)
    quant = _plain(record.get("quantization"))
    if isinstance(quant, dict) and quant.get("scheme"):
        group = quant.get("group_size")
        line = (
            f"- **Quantization**: {quant['scheme']} by {quant.get('method', '?')}, "
            f"{'group ' + str(group) if group else 'one scale per output channel'}, {quant.get('layers')} layers; "
            f"pruned weights revived: {quant.get('revived_weights', '?')}"
        )
        calib = quant.get("calibration") or {}
        if calib.get("sequences"):
            line += f"; calibration: {calib['sequences']} sequences, {calib['tokens']} tokens of {calib.get('source')}"
        if quant.get("not_quantized"):
            line += f"; left in float: {', '.join(quant['not_quantized'])}"
        out.append(line)
    for key, what in (("slorb", "SLoRB branches"), ("row_adapters", "row adapters")):
        value = record.get(key)
        if isinstance(value, dict) and set(value) & {"dropped", "merged"}:
            out.append(f"- **{what}**: {'dropped' if 'dropped' in value else 'merged into the weights'}")
    return out


def evaluation_numbers(result: dict) -> dict:
    """The numbers of a recipe's evaluate stage (`eval.json`), named for a card."""
    names = {
        "ppl": f"{result.get('ppl_dataset', 'text')} perplexity",
        "answer_ppl": "GSM8K answer perplexity",
        "strict_match": "GSM8K strict match",
        "flexible_match": "GSM8K flexible match",
        "self_ppl": "self-generated text perplexity",
    }
    return {name: result[key] for key, name in names.items() if isinstance(result.get(key), (int, float))}


def _evaluation(evaluation: dict | None) -> list[str]:
    """A table of the evaluation numbers given (name -> finite number); none, no table."""
    rows = [(k, v) for k, v in (evaluation or {}).items() if isinstance(v, (int, float)) and v == v]
    if not rows:
        return []
    lines = ["## Evaluation", "", "Measured by sparsefit in the run that made this model:", "", "| metric | value |",
             "| --- | --- |"]  # fmt: skip
    lines += [f"| {k} | {v:.4g} |" for k, v in rows]
    return [*lines, ""]


def _usage(fmt: str, gguf: dict | None) -> list[str]:
    if gguf:
        name = gguf["file"]
        return ["## Use", "", "```sh", f"llama-cli -m {name}",
                "ollama create my-model -f Modelfile  # the Modelfile beside it", "```", ""]  # fmt: skip
    if fmt in SPARSEFIT_ONLY:
        return ["## Use", "", f"The `{fmt}` layout is read back by sparsefit (`sparsefit eval --model DIR`).", ""]
    return ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("DIR")', 'tokenizer = AutoTokenizer.from_pretrained("DIR")',
            "```", ""]  # fmt: skip


def model_card(record: dict, source_record: dict | None = None, evaluation: dict | None = None) -> str:
    """The README.md text for a directory whose `sparsity.json` is `record`; `source_record` is that of
    the checkpoint it was exported from, `evaluation` the numbers an evaluation in the same run gave."""
    record = {k: _plain(v) for k, v in record.items()}
    source_record = {k: _plain(v) for k, v in (source_record or {}).items()}
    fmt = str(record.get("format") or "hf")
    gguf = record.get("gguf") if isinstance(record.get("gguf"), dict) else None
    sparsity = record.get("sparsity") or {}
    overall = sparsity.get("overall")
    spec = source_spec(record)
    base = base_model_of(spec) or (source_record and base_model_of(source_spec(source_record)))
    quant = record.get("quantization") or source_record.get("quantization") or {}
    pruning = record.get("pruning") or source_record.get("pruning") or {}
    tags = ["sparsefit"]
    if isinstance(overall, float) and overall > 0:
        tags += ["sparse", "pruned"]
    if isinstance(pruning, dict):
        tags += [
            str(pruning[k]) for k in ("method", "structure") if pruning.get(k) and pruning.get(k) != "unstructured"
        ]
    if isinstance(quant, dict) and quant.get("scheme"):
        tags += ["quantized", quant["scheme"]]
    if gguf:
        tags += ["gguf", "llama.cpp", fmt.removeprefix("gguf-")]
    elif fmt != "hf":
        tags.append(fmt)
    library = "gguf" if gguf else "sparsefit" if fmt in SPARSEFIT_ONLY else "transformers"
    head = ["---"]
    if base:
        head.append(f"base_model: {_yaml_str(base)}")
    head += [f"library_name: {library}", "pipeline_tag: text-generation", "tags:"]
    head += [f"- {_yaml_str(t)}" for t in dict.fromkeys(tags)]
    head += ["---", ""]

    title = Path(str(spec)).name if spec else "model"
    body = [f"# {title} ({'sparse, ' if 'sparse' in tags else ''}{fmt})", ""]
    body.append(f"Written by sparsefit{f' from [{base}](https://huggingface.co/{base})' if base else ''}.")
    body.append("")
    if isinstance(overall, float):
        body.append(
            f"- **Sparsity (measured)**: {_pct(overall)} zeros over {sparsity.get('weights', '?')} weights, "
            f"{sparsity.get('measured_over', 'the decoder blocks')}"
        )
        excluded = sparsity.get("excluded") or {}
        if excluded:
            body.append(f"- **Not counted**: {'; '.join(f'{k} ({v})' for k, v in excluded.items())}")
    body += _sections(source_record) + _sections(record)
    if gguf:
        types = ", ".join(f"{n} {k}" for k, n in sorted((gguf.get("tensor_types") or {}).items()))
        body.append(
            f"- **GGUF**: `{gguf['file']}` ({types} tensors); pruned weights that read back nonzero from the "
            f"file: {gguf.get('revived')} of {gguf.get('zero_weights')}"
        )
    elif fmt != "hf":
        body.append(f"- **Format**: {fmt}")
    body.append("")
    body += _evaluation(evaluation or record.get("evaluation"))
    body += _usage(fmt, gguf)
    return "\n".join(head + body)
