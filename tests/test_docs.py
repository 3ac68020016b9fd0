"""README.md says only what the CLI takes, what the result files hold and what runs.

- Every `sparsefit ...` command line in README.md (code blocks and inline code) is parsed by the
  CLI's own parser, without running it; every `--flag` anywhere in it is an option of some command,
  and every `--flag` in a command's bullet of "The CLI" one of that command's; every inline
  `--flag value` span (each `a|b` alternative, each value listed after it) parses.
- Every number in a table is a value of the result JSON(s) that table comes from, and every decimal
  in the prose one of some result JSON, as benchmarks/report.py formats values (same decimals;
  bytes also in MiB, fractions also in percent).
- The Python example runs (on the tiny model), the recipe examples validate, and the set-up
  paragraph names the scripts, pins and extras the repository has.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from pathlib import Path

import pytest

from sparsefit.cli.main import build_parser
from sparsefit.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Commands whose README lines leave out `--output` ("plus `--model`, `--output`"): added to parse them.
NEEDS_OUTPUT = {"prune", "quantize", "finetune", "export"}


def command_lines(text: str) -> list[str]:
    """Every `sparsefit ...` command: the lines of bash code blocks (continuations joined, comments
    dropped, split at `&&` and `;`) and the inline code spans that start with `sparsefit `."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line)
            lines += [part.strip() for part in re.split(r"&&|;", line)]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += re.findall(r"`(sparsefit [^`]+)`", prose)
    return [line for line in lines if re.match(r"(\S*/)?sparsefit\s", line)]


def subcommand(name: str):
    parser = build_parser(only=name)
    return parser._subparsers._group_actions[0].choices[name]


def parse(line: str) -> None:
    argv = shlex.split(line)[1:]
    if argv[0] in NEEDS_OUTPUT and "--output" not in argv:
        argv += ["--output", "out/x"]
    build_parser(only=argv[0]).parse_args(argv)


COMMANDS = command_lines(README)


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 20 and any(c.startswith("sparsefit generate") for c in COMMANDS)


@pytest.mark.parametrize("line", COMMANDS)
def test_every_readme_command_parses(line):
    try:
        parse(line)
    except UsageError as err:
        pytest.fail(f"README command does not parse: {line!r}: {err}")


def test_a_wrong_flag_fails_to_parse():
    with pytest.raises(UsageError, match="unrecognized arguments: --no-such-flag"):
        parse("sparsefit prune --no-such-flag")


def cli_bullets(text: str) -> dict[str, str]:
    """The command -> its bullet's text, from the "The CLI" section's `- **`cmd`**` bullets."""
    section = text.split("## The CLI", 1)[1].split("\n## ", 1)[0]
    bullets = {}
    for bullet in re.split(r"\n(?=- \*\*)", section):
        found = re.match(r"- \*\*`(\w+)[^`]*`\*\*", bullet)
        if found:
            bullets[found.group(1)] = bullet
    return bullets


def test_every_flag_in_a_command_bullet_is_an_option_of_that_command():
    bullets = cli_bullets(README)
    assert {"prune", "finetune", "eval", "quantize", "export", "generate", "serve", "run"} <= set(bullets)
    for name, bullet in bullets.items():
        prose = re.sub(r"```.*?```", "", bullet, flags=re.S)  # the code lines are parsed whole above
        prose = re.sub(r"`sparsefit [^`]+`", "", prose)
        options = subcommand(name)._option_string_actions
        unknown = sorted({f for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", prose) if f not in options})
        assert not unknown, f"README's `{name}` bullet shows flags it does not take: {unknown}"


def test_the_shared_flags_are_where_the_readme_says():
    """README: `prune`, `quantize`, `finetune`, `eval` and `export` take `--model`, `--dtype` and
    `--device`; all but `eval` write into `--output` and take `--overwrite`."""
    for name in ("prune", "quantize", "finetune", "eval", "export"):
        options = subcommand(name)._option_string_actions
        assert {"--model", "--dtype", "--device"} <= set(options), name
        assert ({"--output", "--overwrite"} <= set(options)) == (name != "eval"), name


# --- numbers ---------------------------------------------------------------------------------

NUMBER = re.compile(r"\d+(?:\.\d+)?")
NUMERIC_CELL = re.compile(r"[\d.,x%()\s~-]*\d[\d.,x%()\s~-]*")


def table_numbers(text: str) -> list[str]:
    """The numbers of every table cell that holds only numbers (labels and code spans left out)."""
    numbers = []
    for line in text.splitlines():
        if not line.startswith("|") or re.fullmatch(r"[|\s:-]+", line):
            continue
        for cell in line.strip().strip("|").split("|"):
            cell = re.sub(r"`[^`]*`", "", cell).strip()
            if NUMERIC_CELL.fullmatch(cell):
                numbers += NUMBER.findall(cell)
    return numbers


def _leaves(node: object):
    if isinstance(node, dict):
        for v in node.values():
            yield from _leaves(v)
    elif isinstance(node, list):
        for v in node:
            yield from _leaves(v)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield float(node)


@functools.cache
def recorded_numbers(stems: tuple[str, ...] | None = None) -> set[str]:
    """Every numeric value of the result files (`stems`, default all) as report.py prints it: 0 to 3
    decimals, bytes also in MiB and fractions also in percent."""
    shown = set()
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        if stems is not None and path.stem not in stems:
            continue
        for v in _leaves(json.loads(path.read_text())):
            for x in (v, v / 2**20, 100 * v):
                shown.update(f"{x:.{d}f}" for d in range(4))
    return shown


def untraced(text: str, shown: set[str]) -> list[str]:
    return [n for n in table_numbers(text) if n not in shown]


def test_every_number_in_the_readme_tables_is_in_a_result_file():
    shown = recorded_numbers()
    numbers = table_numbers(README)
    assert len(numbers) >= 50  # the settings, quantization and speed tables
    assert not untraced(README, shown), f"README table numbers found in no result JSON: {untraced(README, shown)}"


# The start of each numeric table's header -> the result files its numbers come from.
TABLE_SOURCES = {
    "| goal | command": ("oneshot", "oneshot_avx2"),
    "| model, export | command": ("quantize",),
    "| shape | bound MiB": ("scale",),
    "| runtime, model": ("runtime",),
}


def numeric_tables(text: str) -> dict[str, str]:
    """Header line -> the whole table, for every README table holding numbers."""
    tables = re.findall(r"(?m)^(\|.*\|)\n\|[-|: ]+\|\n((?:\|.*\|\n?)+)", text)
    return {head: f"{head}\n{body}" for head, body in tables if table_numbers(body)}


def test_every_table_number_is_in_its_own_result_file():
    """Stricter than any result file: a typo that happens to match some other JSON's value fails."""
    tables = numeric_tables(README)
    assert len(tables) >= 4
    for head, table in tables.items():
        sources = [s for start, s in TABLE_SOURCES.items() if head.startswith(start)]
        assert sources, f"README table {head!r} has no entry in TABLE_SOURCES: name its result files"
        missing = untraced(table, recorded_numbers(sources[0]))
        assert not missing, f"README table {head!r}: numbers not in {sources[0]}: {missing}"


def test_a_number_no_result_holds_is_found():
    table = "| goal | ppl | time |\n| --- | ---: | ---: |\n| `sparsefit prune` 50% | 45.71 | 1.10x (9.87x) |\n"
    assert table_numbers(table) == ["50", "45.71", "1.10", "9.87"]
    assert untraced(table, recorded_numbers()) == ["9.87"]


# --- every flag, every inline flag span, the prose's measured numbers --------------------------


def all_options() -> set[str]:
    """Every option string of every sparsefit command, and the top-level ones (--debug, --version)."""
    parser = build_parser()
    options = set(parser._option_string_actions)
    for sub in parser._subparsers._group_actions[0].choices.values():
        options |= set(sub._option_string_actions)
    return options


def test_every_flag_anywhere_in_the_readme_is_a_sparsefit_option():
    """Prose outside "The CLI" too (settings, limitations, your files): a renamed or dropped flag fails."""
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", README))
    assert len(flags) >= 50
    others = {"--logdir"}  # tensorboard's own, in the trackers example
    unknown = sorted(flags - all_options() - others)
    assert not unknown, f"README shows flags no sparsefit command takes: {unknown}"


PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*(\.\w+)?|KEY=VALUE|user/name")


# `--scheme w4a16` (default), `w8a16`, `w8a8-int8`: the bare spans after a flag's are its other values
VALUE = r"[\w:.][\w:.-]*"  # not a flag
ALTERNATIVES = re.compile(rf"`(--[a-z][\w-]*) {VALUE}`((?:\s*(?:\([^()]*\))?\s*(?:,\s*or|,|or|/)\s*`{VALUE}`)+)")


def flag_spans(text: str) -> list[str]:
    """Inline code spans that start with a flag and carry a value (`--values int8`, `--calib a|b|FILE`),
    and `--flag v` for each bare value span listed after one (`--method gptq` (default) or `rtn`)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = [" ".join(s.split()) for s in re.findall(r"`(--[a-z][^`]*)`", prose) if len(s.split()) > 1]
    for m in ALTERNATIVES.finditer(prose):
        spans += [f"{m.group(1)} {v}" for v in re.findall(rf"`({VALUE})`", re.sub(r"\([^()]*\)", "", m.group(2)))]
    return spans


def span_argvs(span: str) -> list[list[str]]:
    """The argument lists a span stands for: one per `|` alternative of a single flag's value, with
    placeholders (N, FILE.yaml, HUB_ID, KEY=VALUE) given a value any option of that kind accepts."""
    tokens = span.split()
    if len(tokens) == 2 and "|" in tokens[1]:
        return [[tokens[0], "1" if PLACEHOLDER.fullmatch(v) else v] for v in tokens[1].split("|")]
    return [["1" if PLACEHOLDER.fullmatch(t) else t for t in tokens]]


def parses_in(name: str, argv: list[str]) -> bool:
    full = [name, *argv]
    if name in NEEDS_OUTPUT and "--output" not in argv:
        full += ["--output", "out/x"]
    if name == "run":
        full.append("quick")
    try:
        build_parser(only=name).parse_args(full)
    except UsageError:
        return False
    return True


def commands_taking(flag: str) -> list[str]:
    names = build_parser()._subparsers._group_actions[0].choices
    return [name for name in names if flag in subcommand(name)._option_string_actions]


def test_every_flag_span_parses_in_a_command_that_takes_it():
    """`--isa amx`, `--offload-dir none`, `--method rtn`, every alternative of `--runtime sparse|dense|hf`:
    each parses in its bullet's command, or (outside "The CLI") in some command taking the flag."""
    bullets = cli_bullets(README)
    spans = [(name, s) for name, bullet in bullets.items() for s in flag_spans(bullet)]
    spans += [(None, s) for s in flag_spans(README) if not any(s == t for _, t in spans)]
    assert len(spans) >= 15
    failed = []
    for name, span in spans:
        for argv in span_argvs(span):
            names = [name] if name else commands_taking(argv[0])
            if not any(parses_in(n, argv) for n in names):
                failed.append(f"{' '.join(argv)} ({name or 'any command'})")
    assert not failed, f"README flag spans the CLI does not parse: {failed}"


def test_the_values_listed_after_a_flag_span_are_its_spans():
    text = "`--scheme w4a16` (default), `w8a16`, `w8a8-int8`; `--method gptq` (default: `x`) or `rtn`; `--a b`, `--c`."
    assert flag_spans(text) == ["--scheme w4a16", "--method gptq", "--a b", "--scheme w8a16", "--scheme w8a8-int8",
                                "--method rtn"]  # fmt: skip


def test_a_flag_span_with_a_wrong_value_fails():
    assert not parses_in("generate", span_argvs("--isa avx9000")[0])
    assert [parses_in("generate", a) for a in span_argvs("--runtime sparse|dense|tpu")] == [True, True, False]


# Decimals in prose that are not measurements: versions, written after these words.
VERSION_WORDS = ("Python >= ", "torch ")


def prose_decimals(text: str) -> list[str]:
    """Every decimal number of the README's prose (code blocks, code spans and tables left out)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("|"))
    text = re.sub(r"`[^`]*`", "", text)
    found = []
    for m in re.finditer(r"(?<![\w.])\d+\.\d+(?![\w.]*\d)", text):
        if not text[: m.start()].endswith(VERSION_WORDS):
            found.append(m.group(0))
    return found


def test_every_decimal_in_the_readme_prose_is_in_a_result_file():
    """The first paragraph's gains and the sentences beside the tables: each figure from a result JSON."""
    numbers = prose_decimals(README)
    assert len(numbers) >= 30 and "122.6" in numbers and "339.81" in numbers
    missing = [n for n in numbers if n not in recorded_numbers()]
    assert not missing, f"README prose numbers found in no result JSON: {missing}"


def test_a_prose_number_no_result_holds_is_found():
    text = "It decodes 122.6 tokens/s on torch 2.11 (`--seed 0.5`), 9.87x faster.\n| 1.23 |\n"
    assert prose_decimals(text) == ["122.6", "9.87"]
    assert [n for n in prose_decimals(text) if n not in recorded_numbers()] == ["9.87"]


# --- the set-up, the Python example and the recipe example -----------------------------------


def test_the_setup_paragraph_matches_the_scripts_and_the_extras():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "`sparsefit[all,gpu,trackers]`" in README and '".[all,gpu,trackers]"' in setup
    assert "`torch==2.13.0`" in README and '"torch==2.13.0"' in setup
    for script in re.findall(r"bash (scripts/\w+\.sh)", README):
        assert (ROOT / script).is_file(), script
    extras = re.search(r"\(extras: ((?:`\w+`,?\s*)+)\)", README).group(1)
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = set(re.findall(r"^(\w+) = \[", pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0],
                              flags=re.M))  # fmt: skip
    assert set(re.findall(r"`(\w+)`", extras)) == declared - {"all"}


PYTHON_EXAMPLE = re.search(r"```python\n(.*?)```", README, flags=re.S).group(1)


def test_the_python_example_runs(tiny_checkpoint, data_dir, tmp_path, monkeypatch):
    """The README's Python block, on the tiny model with small sizes; each replaced text must be in
    the block, so an edit of the example that this test cannot follow fails here."""
    monkeypatch.chdir(tmp_path)
    replace = {
        '"smollm2-135m"': repr(str(tiny_checkpoint)),
        'calib="self")': 'calib="self", num_samples=2, seq_len=32)',
        "seq_len=256": "seq_len=32, self_samples=4",
        "max_steps=12": "max_steps=2",
        "seq_len=2048": "seq_len=64",
    }
    code = PYTHON_EXAMPLE
    for old, new in replace.items():
        assert old in code, f"the README's Python example no longer holds {old!r}: update this test"
        code = code.replace(old, new)
    exec(compile(code, "README.md (Python API)", "exec"), {})
    assert (tmp_path / "out" / "py-final" / "sparsity.json").is_file()


def test_the_recipe_examples_validate(tmp_path, capsys, monkeypatch):
    from sparsefit.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_recipe.yaml").write_text(re.search(r"```yaml\n(.*?)```", README, flags=re.S).group(1))
    assert main(["run", "my_recipe.yaml", "--check"]) == 0
    assert "5 stages" in capsys.readouterr().out
    line = next(c for c in COMMANDS if c.startswith("sparsefit run gsm8k-50 --set"))
    assert main([*shlex.split(line)[1:], "--check"]) == 0
