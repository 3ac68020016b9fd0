"""Property-based fuzzing of the readers of files sparsefit did not just write itself: mutated
safetensors checkpoints (truncated, bytes flipped), bitmask parts whose shapes, offsets, counts and
dtypes disagree, side files (row adapters, SLoRB) with wrong tensors, and recipes with wrongly typed
fields. Each case must load correctly or end in sparsefit's own clean error, never in another
exception, and the process must not grow by a large allocation (a small file claiming a huge
tensor). Bounded: few examples, a deadline each, the whole file well under 30 s."""

import copy
import os
import resource
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from sparsefit.errors import SparsefitError, UsageError
from sparsefit.export.bitmask import compress_24_bitmask, compress_bitmask
from sparsefit.models import load_model
from sparsefit.models.bitmask import decompress_state_dict
from sparsefit.models.layout import decoder_linears
from sparsefit.models.row_deltas import attach_row_deltas, load_row_deltas, row_delta_state, save_row_deltas
from sparsefit.models.slorb import attach_slorb, load_slorb, save_slorb, slorb_state
from sparsefit.recipes.loading import builtin_recipes, read_recipe_data, recipe_from_data
from sparsefit.runtime.checkpoint import CheckpointTensors
from tests.conftest import tiny_model

# The fast slice CI runs is fixed (derandomized); SPARSEFIT_FUZZ_SCALE=N runs N times the cases on
# fresh random draws (the long run: benchmarks/fuzz.py).
SCALE = max(1, int(os.environ.get("SPARSEFIT_FUZZ_SCALE", "1")))


def fuzz(examples: int, deadline: int, **kw: object) -> settings:
    return settings(max_examples=examples * SCALE, deadline=deadline, derandomize=SCALE == 1, **kw)


FUZZ = fuzz(25, 2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
GROWTH_MB = 256  # what one case may add to the process's peak memory


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "plain"
    tiny_model("llama").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_peak():
    return peak_mb()


def bounded(base: float) -> None:
    grown = peak_mb() - base
    assert grown < GROWTH_MB, f"peak memory grew by {grown:.0f} MB"


# ---- safetensors checkpoints ---------------------------------------------------------------------

mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("header"), st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=4)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
)


def mutate(data: bytes, how) -> bytes:
    kind, arg = how
    out = bytearray(data)
    header = 8 + int.from_bytes(data[:8], "little")
    if kind == "truncate":
        return bytes(out[: int(arg * (len(out) - 1))])
    if kind == "length":
        out[:8] = arg.to_bytes(8, "little")
        return bytes(out)
    span = header if kind == "header" else len(out)
    for where, xor in arg:
        out[min(int(where * span), len(out) - 1)] ^= xor
    return bytes(out)


@FUZZ
@given(how=mutations)
def test_a_mutated_safetensors_checkpoint_loads_or_is_one_clean_error(plain, base_peak, tmp_path, how):
    folder = tmp_path / "m"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(plain, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(mutate((plain / "model.safetensors").read_bytes(), how))
    for read in (lambda: load_model(folder), lambda: [CheckpointTensors(folder).tensor(k) for k in sorted(
            CheckpointTensors(folder).keys())]):  # fmt: skip
        try:
            read()
        except SparsefitError as err:
            assert "\n" not in str(err).strip()
    bounded(base_peak)


# ---- bitmask parts -------------------------------------------------------------------------------

INTS = st.integers(-(2**40), 2**40)
part_changes = st.lists(
    st.one_of(
        st.tuples(st.just("shape"), st.lists(INTS, min_size=0, max_size=3)),
        st.tuples(st.just("row_offsets"), st.lists(INTS, min_size=0, max_size=8)),
        st.tuples(st.just("drop"), st.sampled_from(["compressed", "bitmask", "row_offsets", "shape"])),
        st.tuples(st.just("count"), st.integers(-5, 5)),
        st.tuples(st.just("dtype"), st.sampled_from(["compressed", "bitmask", "row_offsets", "shape"])),
        st.tuples(st.just("bitmask"), st.tuples(st.integers(0, 9), st.integers(0, 9))),
        st.tuples(st.just("scale"), st.sampled_from([float("nan"), float("inf"), 0.0, 1e38])),
    ),
    min_size=1,
    max_size=3,
)


@fuzz(200, 1000)
@given(fmt=st.sampled_from(["sparse-bitmask", "sparse-24-bitmask"]), changes=part_changes)
def test_bitmask_parts_that_disagree_are_a_value_error(fmt, changes):
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    w.view(6, 4, 4)[..., :2] = 0
    parts = (compress_bitmask if fmt == "sparse-bitmask" else compress_24_bitmask)(w)
    dtypes = {"compressed": torch.int64, "bitmask": torch.float32, "row_offsets": torch.float32, "shape": torch.uint8}
    for kind, arg in changes:
        if kind == "shape":
            parts["shape"] = torch.tensor(arg, dtype=torch.int64)
        elif kind == "row_offsets":
            parts["row_offsets"] = torch.tensor(arg, dtype=torch.int64)
        elif kind == "drop":
            parts.pop(arg, None)
        elif kind == "count" and "compressed" in parts:
            flat = parts["compressed"].flatten()
            parts["compressed"] = torch.cat([flat, flat[: max(arg, 0)]])[: max(flat.numel() + arg, 0)]
        elif kind == "dtype" and arg in parts:
            parts[arg] = parts[arg].to(dtypes[arg])
        elif kind == "bitmask":
            parts["bitmask"] = torch.zeros(arg, dtype=torch.uint8)
        elif kind == "scale" and "compressed" in parts:
            parts["compressed"] = (parts["compressed"].float() * 10).round().clamp(-127, 127).to(torch.int8)
            parts["weight_scale"] = torch.full((6, 1), arg)
    state = {f"layer.{k}": v for k, v in parts.items()}
    try:
        out, _ = decompress_state_dict(state, fmt)
    except ValueError as err:
        assert "\n" not in str(err)
    else:  # what loads is a (6, 16) weight of finite values
        if "layer.bitmask" not in state:  # no compressed weight there: its stray parts fail the loader's
            assert "layer.weight" not in out  # check for unexpected tensors
            return
        assert out["layer.weight"].shape == (6, 16) and out["layer.weight"].float().isfinite().all()


# ---- side files ----------------------------------------------------------------------------------

side_changes = st.one_of(
    st.tuples(st.just("rows"), st.lists(st.integers(-(2**33), 2**33), min_size=0, max_size=6)),
    st.tuples(st.just("shape"), st.tuples(st.integers(0, 7), st.integers(0, 300))),
    st.tuples(st.just("dtype"), st.sampled_from([torch.int8, torch.bool, torch.float16, torch.int64])),
    st.tuples(st.just("value"), st.sampled_from([float("nan"), float("inf"), 1e30])),
    st.tuples(st.just("bytes"), st.binary(min_size=0, max_size=64)),
    st.tuples(st.just("rename"), st.text(min_size=1, max_size=20)),
)


def changed_side_file(path, how, key_part):
    kind, arg = how
    if kind == "bytes":
        path.write_bytes(arg)
        return
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if k.endswith(key_part) or kind in ("shape", "dtype", "value", "rename"))
    if kind == "rows":
        key = next((k for k in tensors if k.endswith(".rows")), key)
        tensors[key] = torch.tensor(arg, dtype=torch.int64)
    elif kind == "shape":
        tensors[key] = torch.zeros(arg)
    elif kind == "dtype":
        tensors[key] = tensors[key].to(arg)
    elif kind == "value":
        tensors[key] = tensors[key].float().clone()
        tensors[key].view(-1)[0] = arg
    elif kind == "rename":
        tensors[arg] = tensors.pop(key)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(path), metadata=meta)


@FUZZ
@given(kind=st.sampled_from(["rows", "slorb"]), how=side_changes)
def test_a_mutated_side_file_restores_or_is_a_value_error(base_peak, tmp_path, kind, how):
    model = tiny_model("llama")
    linears = {n: m for n, m in decoder_linears(model).items() if n.endswith(("q_proj", "down_proj"))}
    folder = tmp_path / "side"
    folder.mkdir(exist_ok=True)
    if kind == "rows":
        attach_row_deltas(linears, {n: torch.tensor([0, 3, 5]) for n in linears})
        save_row_deltas(row_delta_state(model), folder)
        path, load, part = folder / "row_adapters.safetensors", load_row_deltas, ".rows"
    else:
        attach_slorb(linears, 4)
        save_slorb(slorb_state(model), folder, 4)
        path, load, part = folder / "slorb.safetensors", load_slorb, ".weight"
    changed_side_file(path, how, part)
    fresh = tiny_model("llama")
    try:
        load(fresh, folder)
    except ValueError as err:  # the loader reports it as one UsageError line
        assert str(err) and "\n" not in str(err)
    bounded(base_peak)


# ---- recipes -------------------------------------------------------------------------------------

WRONG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def paths_of(data, prefix=()):
    """Every (path, value) of a nested recipe, containers included."""
    yield prefix, data
    if isinstance(data, dict):
        for k, v in data.items():
            yield from paths_of(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from paths_of(v, (*prefix, i))


@fuzz(60, 1000)
@given(name=st.sampled_from(sorted(builtin_recipes())), pick=st.integers(0, 10**6), value=WRONG)
def test_a_recipe_with_a_wrongly_typed_field_is_valid_or_one_usage_error(name, pick, value):
    data, label = read_recipe_data(name)
    data = copy.deepcopy(data)
    paths = [p for p, _ in paths_of(data) if p]
    path = paths[pick % len(paths)]
    holder = data
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = value
    try:
        recipe_from_data(data, label)
    except UsageError as err:
        assert "\n" not in str(err).strip()
