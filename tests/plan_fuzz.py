"""Mutation fuzzing of the plan and official-book loaders, shared by the in-suite test (hypothesis, ~30 s) and the long
run (``python benchmarks/plan_fuzz.py --cases 10000``).

A case takes a valid seed plan of one family at a tiny layout (or the same plan written as an official cache book),
mutates it at the dict level (replace, delete or add a value anywhere, flip a bit, resize a list) or at the text
level (flip, insert or delete bytes, truncate, inject a BOM, deep brackets, a huge number, non-UTF-8 bytes), and
loads it through the real file path. The only allowed outcomes: a :class:`PlanError`, or a plan that then runs in
the engine on a tiny model of exactly its layout, reusing where it says it does.

Every choice comes from ``draw(low, high)`` (an inclusive integer), so hypothesis can drive and shrink a case and
the long run can drive it from a seeded ``random.Random``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch

import invardiff
from invardiff import CachePlan, ModelFacts, PlanError
from invardiff.engine.state import REUSED
from invardiff.families import families, get_family
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.official import convert_official_book, official_book


Draw = Callable[[int, int], int]
STEPS = 4
LAYERS = 2  # layers of every block list in the seed plans


def fuzz_families() -> list[str]:
    """The registered families the fuzz can run plans on: those with a tiny config (``ConfigSpec.tiny``)."""
    return [spec.name for spec in families() if spec.configs is not None and spec.configs.tiny is not None]


def official_families() -> list[str]:
    """The fuzzed families whose official books invardiff writes (``OfficialSpec.write``): their books are fuzzed."""
    official = {name: get_family(name).official for name in fuzz_families()}
    return [name for name, spec in official.items() if spec is not None and spec.write is not None]


ODD_VALUES = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    3,
    2**63,
    1.5,
    float("1e300"),
    "",
    "x",
    "0101",
    "attn",
    [],
    {},
    [0],
    ["attn", ["x"]],
    [True, False],
    {"a": 1},
    [[True]],
    "\u00e9",
    -0.0,
]


def seed_plan(family: str, draw: Draw) -> CachePlan:
    """A valid plan of ``family`` at its fuzz layout: random step gate and reuse, repaired to be executable."""
    facts = ModelFacts.for_family(family, _layers(family))
    step_cache = [False] + [bool(draw(0, 1)) for _ in range(STEPS - 1)]
    executed = [t for t in range(STEPS) if not step_cache[t]]
    reuse = {}
    for block in facts.block_lists:
        reuse[block.name] = {}
        for kind in block.module_kinds:
            rows = [[bool(draw(0, 1)) for _ in range(block.num_layers)] for _ in range(STEPS)]
            rows[executed[0]] = [False] * block.num_layers  # the first executed step has nothing to reuse
            reuse[block.name][kind] = rows
    return CachePlan(facts, STEPS, step_cache, reuse)


# ----- mutations -----
def mutate_value(data, draw: Draw):
    """One dict-level mutation somewhere in the JSON value ``data`` (mutated in place; returns the new root)."""
    containers = list(_containers(data))
    container = containers[draw(0, len(containers) - 1)]
    keys = list(container) if isinstance(container, dict) else list(range(len(container)))
    op = draw(0, 5)
    if not keys or op == 0:  # add a value
        value = _odd(draw)
        if isinstance(container, dict):
            container[["extra", "format", "model", "step_cache", "num_layers", "attn"][draw(0, 5)]] = value
        else:
            container.insert(draw(0, len(container)), value)
        return data
    key = keys[draw(0, len(keys) - 1)]
    if op == 1:  # delete
        del container[key]
    elif op == 2:  # replace with an odd value
        container[key] = _odd(draw)
    elif op == 3 and isinstance(container[key], str) and container[key]:  # flip one character of a bit string
        text = container[key]
        position = draw(0, len(text) - 1)
        flipped = {"0": "1", "1": "0"}.get(text[position], "0")
        container[key] = text[:position] + flipped + text[position + 1 :]
    elif op == 3 and isinstance(container[key], bool):
        container[key] = not container[key]
    elif op == 4 and isinstance(container[key], list) and container[key]:  # duplicate or drop a row
        rows = container[key]
        if draw(0, 1):
            rows.append(rows[draw(0, len(rows) - 1)])
        else:
            rows.pop(draw(0, len(rows) - 1))
    elif op == 5 and isinstance(container[key], int) and not isinstance(container[key], bool):
        container[key] += [-1, 1, -100, 10**6][draw(0, 3)]
    else:
        container[key] = _odd(draw)
    return data


def mutate_text(text: str, draw: Draw) -> bytes:
    """One text-level mutation of a JSON document, as bytes."""
    raw = text.encode()
    position = draw(0, len(raw))
    op = draw(0, 8)
    if op == 0:  # flip a byte
        if position == len(raw):
            position -= 1
        return raw[:position] + bytes([raw[position] ^ (1 << draw(0, 7))]) + raw[position + 1 :]
    if op == 1:  # delete a span
        return raw[:position] + raw[position + draw(1, 40) :]
    if op == 2:  # truncate
        return raw[:position]
    if op == 3:  # insert JSON punctuation
        return raw[:position] + [b"[", b"]", b"{", b"}", b",", b'"', b":", b"\\", b"null"][draw(0, 8)] + raw[position:]
    if op == 4:  # a byte-order mark (tolerated) or non-UTF-8 bytes
        return [b"\xef\xbb\xbf" + raw, b"\xff\xfe" + raw, raw[:position] + b"\xc3\x28" + raw[position:]][draw(0, 2)]
    if op == 5:  # a huge or non-finite number where a digit is
        digit = raw.find(b"0", position)
        if digit < 0:
            return raw + b" "
        number = [b"9" * 5000, b"1e999", b"NaN", b"-Infinity", b"123456789012345678901234"][draw(0, 4)]
        return raw[:digit] + number + raw[digit + 1 :]
    if op == 6:  # deep nesting
        depth = [31, 33, 3000][draw(0, 2)]
        return raw[:position] + b"[" * depth + b"]" * depth + raw[position:]
    if op == 7:  # swap a compute/reuse character
        for index in range(position, len(raw)):
            if raw[index : index + 1] in (b"0", b"1"):
                return raw[:index] + (b"1" if raw[index : index + 1] == b"0" else b"0") + raw[index + 1 :]
        return raw
    return raw.replace(b"true", b"false", 1) if draw(0, 1) else raw.replace(b"false", b"true", 1)


def _containers(value):
    if isinstance(value, (dict, list)):
        yield value
        for child in value.values() if isinstance(value, dict) else value:
            yield from _containers(child)


def _odd(draw: Draw):
    value = ODD_VALUES[draw(0, len(ODD_VALUES) - 1)]
    return json.loads(json.dumps(value)) if isinstance(value, (list, dict)) else value


# ----- one case -----
@dataclasses.dataclass
class Outcome:
    kind: str  # "rejected", "ran" or "foreign" (an exception other than PlanError: a fuzz failure)
    detail: str = ""


def run_case(family: str, form: str, level: str, draw: Draw, directory: Path) -> Outcome:
    """Mutate a seed of ``family`` (``form``: ``"plan"`` or ``"book"``; ``level``: ``"dict"`` or ``"text"``), load it
    from a file in ``directory`` and, if accepted, run it on a tiny model of its layout."""
    plan = seed_plan(family, draw)
    value = plan.to_dict() if form == "plan" else official_book(plan)
    for _ in range(draw(1, 3) if level == "dict" else 0):
        value = mutate_value(value, draw)
    raw = mutate_text(json.dumps(value, indent=1), draw) if level == "text" else json.dumps(value).encode()
    path = directory / f"{family}-{form}.json"
    path.write_bytes(raw)
    try:
        loaded = CachePlan.load(path) if form == "plan" else convert_official_book(path, family)
    except PlanError as error:
        return Outcome("rejected", str(error)[:200])
    except Exception as error:  # noqa: BLE001 - the fuzz's finding: anything but PlanError
        return Outcome("foreign", f"{type(error).__name__}: {error}"[:500] + f"\n{raw[:300]!r}")
    run_plan(loaded)
    return Outcome("ran")


_MODELS: dict = {}


def run_plan(plan: CachePlan) -> None:
    """Run ``plan`` through the engine on a tiny random model of exactly its layout; check the reused steps."""
    family = plan.model.family
    layers = {facts.name: facts.num_layers for facts in plan.model.block_lists}
    key = (family, tuple(sorted(layers.items())))
    if key not in _MODELS:
        _MODELS[key] = _tiny_model(family, layers)
    transformer, call = _MODELS[key]
    with invardiff.enabled(transformer, plan):
        for step in range(plan.num_inference_steps):
            with invardiff.cache_context(transformer, "default", step_index=step):
                transformer(**call)
        status = invardiff.summary(transformer).branches["default"].step_status
    assert ((status == REUSED) == plan.step_cache).all(), "the engine's step-cached steps differ from the plan's"


def _tiny_model(family: str, layers: dict[str, int]):
    """The family's tiny model with each block list cut or extended (copies of its blocks, in turn) to ``layers``."""
    config = MODEL_CONFIGS[get_family(family).configs.tiny]
    transformer = config.build_transformer()
    for name, count in layers.items():
        blocks = getattr(transformer, name)
        setattr(transformer, name, torch.nn.ModuleList(copy.deepcopy(blocks[i % len(blocks)]) for i in range(count)))
    with torch.no_grad():
        return transformer, config.example_call()


def _layers(family: str) -> dict[str, int]:
    return dict.fromkeys((b.attr for b in get_family(family).block_lists), LAYERS)
