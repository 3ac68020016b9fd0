"""Datasets by name or path: WikiText-2, GSM8K, local .txt / .jsonl files, hub ids.

Named datasets resolve first from the data folder, `SPARSEFIT_DATA_DIR` or by default `data` in the
sparsefit cache (`~/.cache/sparsefit/data`), laid out as `wikitext-2-raw/wiki.test.raw` and
`gsm8k/{train,test}.jsonl`; then from the Hugging Face hub through `datasets`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sparsefit.errors import UsageError, first_line

NAMED = ("wikitext2", "gsm8k")
_LOCAL_FILES = {
    ("wikitext2", "test"): "wikitext-2-raw/wiki.test.raw",
    ("wikitext2", "train"): "wikitext-2-raw/wiki.train.raw",
    ("wikitext2", "validation"): "wikitext-2-raw/wiki.valid.raw",
    ("gsm8k", "train"): "gsm8k/train.jsonl",
    ("gsm8k", "test"): "gsm8k/test.jsonl",
}
_HUB = {"wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1"), "gsm8k": ("openai/gsm8k", "main")}
# Where to get the files when neither the data folder nor the hub has them (named in the error).
_ORIGIN = {
    "wikitext2": "WikiText-2 raw is the hub's Salesforce/wikitext, wikitext-2-raw-v1",
    "gsm8k": "GSM8K's jsonl files are in github.com/openai/grade-school-math, grade_school_math/data",
}


def data_dir() -> Path:
    """The data folder: `SPARSEFIT_DATA_DIR`, else `data` in the sparsefit cache."""
    from sparsefit.cache import cache_root

    value = os.environ.get("SPARSEFIT_DATA_DIR")
    return Path(value).expanduser() if value else cache_root() / "data"


def question_prompt(question: str) -> str:
    """A GSM8K question as the harness's gsm8k task prompts it (evaluation and fine-tuning alike)."""
    return f"Question: {question}\nAnswer:"


def format_gsm8k(row: dict) -> str:
    """A GSM8K row as one training text: the harness's `Question: ...\\nAnswer: ...` layout."""
    return f"{question_prompt(row['question'])} {row['answer']}"


def join_wikitext(lines: list[str]) -> str:
    """Join WikiText rows as the SparseGPT/Wanda evaluations do: `"\\n\\n".join(test["text"])`."""
    return "\n\n".join(lines)


def _local_file(name: str, split: str) -> Path | None:
    """Where a named split would live in the data folder (None for an unknown split)."""
    return data_dir() / _LOCAL_FILES[name, split] if (name, split) in _LOCAL_FILES else None


def load_rows(name: str, split: str = "test") -> list[dict]:
    """Rows of a named dataset (`gsm8k`: dicts with `question` and `answer`)."""
    if name not in NAMED:
        raise UsageError(f"unknown named dataset '{name}'; use one of: {', '.join(NAMED)}")
    if (name, split) not in _LOCAL_FILES:
        splits = sorted(s for n, s in _LOCAL_FILES if n == name)
        raise UsageError(f"dataset '{name}' has no split '{split}'; use one of: {', '.join(splits)}")
    local = _local_file(name, split)
    if local is not None and local.is_file():
        if name == "wikitext2":
            return [{"text": line} for line in read_text(local).splitlines(keepends=True)]
        return _check_gsm8k(read_jsonl(local), local)
    return _hub_rows(name, split, local)


def _check_gsm8k(rows: list[dict], path: Path) -> list[dict]:
    """GSM8K rows: at least one, each with a `question` and an `answer` string."""
    if not rows:
        raise UsageError(f"{path} holds no rows; point SPARSEFIT_DATA_DIR at a complete GSM8K copy")
    for i, row in enumerate(rows, 1):
        if not (isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)):
            raise UsageError(f"{path}: row {i} lacks a 'question' or 'answer' string (fields: {', '.join(row)})")
    return rows


def wikitext_stream(split: str = "test") -> str:
    """WikiText-2 raw as one text stream.

    A local `wiki.*.raw` file already is the stream (read with universal newlines); from the
    hub, rows are joined as the SparseGPT/Wanda evaluations do. The local file gives the
    reference figure (SmolLM2-135M, 8 x 2048: ppl 19.27).
    """
    local = _local_file("wikitext2", split)
    if local is not None and local.is_file():
        return read_text(local)
    return join_wikitext([r["text"] for r in load_rows("wikitext2", split)])


def _hub_rows(name: str, split: str, local: Path | None) -> list[dict]:
    hub_id, config = _HUB[name]
    where = "SPARSEFIT_DATA_DIR" if os.environ.get("SPARSEFIT_DATA_DIR") else "the default data folder"
    try:
        import datasets
    except ImportError:
        hub = f"the hub ({hub_id}) needs datasets: pip install 'sparsefit[data]'"
    else:
        try:
            return list(datasets.load_dataset(hub_id, config, split=split))
        except Exception as err:  # any hub failure ends the same way: name both places tried
            hub = f"the hub ({hub_id}) failed: {first_line(err, 160)}"
    raise UsageError(
        f"dataset '{name}' split '{split}' not found: not in {local} ({where}), and {hub}; put the file "
        f"there or set SPARSEFIT_DATA_DIR to a folder holding '{_LOCAL_FILES[name, split]}' ({_ORIGIN[name]})"
    )


def read_text(path: Path) -> str:
    """A data file's text with universal newlines (as `open` reads it); a file that is not UTF-8 is a
    one-line error naming the byte."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per line (blank lines skipped)."""
    rows = []
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{lineno} is not valid JSON ({err.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise UsageError(
                f"{path}:{lineno} is a JSON {type(row).__name__}, not an object; write one object per line, "
                'e.g. {"text": "..."}'
            )
        rows.append(row)
    return rows


def load_texts(spec: str, split: str = "test", text_field: str = "text") -> list[str]:
    """Texts of a dataset, ready to tokenize.

    `wikitext2` gives one joined stream; `gsm8k` one formatted text per row; a `.txt` file
    its whole content; a `.jsonl` file the `text_field` of each row; anything else with a
    slash is tried as a hub id through `datasets`.
    """
    if spec == "wikitext2":
        texts = [wikitext_stream(split)]
    elif spec == "gsm8k":
        texts = [format_gsm8k(r) for r in load_rows(spec, split)]
    else:
        texts = _texts_from_path_or_hub(spec, split, text_field)
    if not any(t.strip() for t in texts):
        raise UsageError(f"dataset '{spec}' is empty; pass a dataset with text in it")
    return texts


def _texts_from_path_or_hub(spec: str, split: str, text_field: str) -> list[str]:
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".txt":
            return [read_text(path)]
        if path.suffix == ".jsonl":
            rows = read_jsonl(path)
            missing = [i for i, r in enumerate(rows) if text_field not in r]
            if missing:
                fields = ", ".join(sorted(rows[missing[0]])) or "none"
                raise UsageError(
                    f"{path}: row {missing[0] + 1} has no field '{text_field}' (fields: {fields}); "
                    "pick one with --text-field"
                )
            return [str(r[text_field]) for r in rows]
        raise UsageError(f"dataset file '{spec}' must end in .txt or .jsonl")
    if spec.startswith((".", "/", "~")) or spec.endswith((".txt", ".jsonl")) or "/" not in spec:
        raise UsageError(
            f"dataset '{spec}' not found: not a named dataset ({', '.join(NAMED)}), not an existing "
            ".txt/.jsonl file, not a hub id 'org/name'"
        )
    try:
        import datasets

        ds = datasets.load_dataset(spec, split=split)
    except ImportError:
        raise UsageError(
            f"dataset '{spec}' looks like a hub id; install the extra: pip install 'sparsefit[data]'"
        ) from None
    except Exception as err:
        reason = first_line(err, 160)
        raise UsageError(f"could not load dataset '{spec}' from the hub ({reason}); pass a local file") from None
    if text_field not in ds.column_names:
        raise UsageError(
            f"dataset '{spec}' has no field '{text_field}' (fields: {', '.join(ds.column_names)}); use --text-field"
        )
    return [str(t) for t in ds[text_field]]
