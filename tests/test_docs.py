"""README.md says only what the CLI takes and what the result files hold.

Every `sparsefit ...` command line in README.md (code blocks and inline code) is parsed by the CLI's
own parser, without running it; every `--flag` in a command's bullet of "The CLI" is one of that
command's options; every number in a table of README.md is a value of some benchmarks/results JSON,
as benchmarks/report.py formats values (same decimals; bytes also in MiB, fractions also in percent).
"""

from __future__ import annotations

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


def recorded_numbers() -> set[str]:
    """Every numeric value of the result files as report.py prints it: 0 to 3 decimals, bytes also
    in MiB and fractions also in percent."""
    shown = set()
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
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


def test_a_number_no_result_holds_is_found():
    table = "| goal | ppl | time |\n| --- | ---: | ---: |\n| `sparsefit prune` 50% | 45.71 | 1.10x (9.87x) |\n"
    assert table_numbers(table) == ["50", "45.71", "1.10", "9.87"]
    assert untraced(table, recorded_numbers()) == ["9.87"]
