"""FLOP profile of a model config, measured with ``torch.utils.flop_counter`` on the meta device.

Per reusable unit and layer: the FLOPs a reuse saves. Per step: the FLOPs of a full forward (embeddings,
modulation, unit FLOPs, what is always paid such as Flux single-block ``proj_out``, and the head), and of a
step-cached step (conditioning plus head). Only matmul-class ops are counted (what FlopCounterMode counts, plus
attention on every backend, see :func:`flop_counter`); elementwise work is treated as free, which makes the ideal
speedup an upper bound. ``inspect`` and ``bench`` count with the same :func:`flop_counter`.

One elementwise cost is counted, because a plan adds it rather than skips it: a reused entry that extrapolates
(``v_a + c (v_a - v_p)``, one ``torch.lerp``) costs :data:`LERP_FLOPS` per element of the value it rebuilds; the
profile records those sizes (the step stream H, and each unit's cached output per layer).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .families import get_family
from .families.model_config import ModelConfig
from .families.spec import TransformerCall, pre_head_capture
from .meta_values import MetaValues
from .plan import CachePlan


# Attention kernels torch's FLOP table misses: the CPU flash kernel that scaled_dot_product_attention dispatches to
# on CPU tensors (uncounted, a FLUX run on CPU came out 7.6% low against the same run on the meta device).
_ATTENTION_KERNELS = ("_scaled_dot_product_flash_attention_for_cpu",)


# FLOPs per element of an extrapolated reuse: lerp(p, a, w) = p + w (a - p) is a subtraction, a multiplication and
# an addition.
LERP_FLOPS = 3


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no display) that also counts attention on the backends torch's table misses, so that a
    run counts the same FLOPs on CPU, CUDA and the meta device, and ``torch.lerp`` (an extrapolated reuse, the one
    elementwise op a plan adds; :data:`LERP_FLOPS` per element)."""
    extra = {
        getattr(torch.ops.aten, name): _attention_flops for name in _ATTENTION_KERNELS if hasattr(torch.ops.aten, name)
    }
    extra[torch.ops.aten.lerp] = _lerp_flops  # the overload packet: Scalar and Tensor weights alike
    return FlopCounterMode(display=False, custom_mapping=extra)


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)  # torch's formula for its other attention kernels


def _lerp_flops(*args, out_shape=None, **kwargs) -> int:
    return LERP_FLOPS * math.prod(out_shape)


@dataclass
class FlopProfile:
    config_name: str
    family: str
    num_layers: dict[str, int]
    full_step: float
    step_cached: float
    units: dict[str, dict[str, np.ndarray]]  # {block_list: {unit: (L,) FLOPs saved by a reuse}}
    step_elements: float = 0.0  # elements of H in one call: what an extrapolated step-cached step rebuilds
    unit_elements: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # {block_list: {unit: (L,)}}

    def extrapolation_flops(self, stream_elements: float) -> float:
        """FLOPs of one extrapolated reuse of a value of ``stream_elements`` elements."""
        return LERP_FLOPS * stream_elements

    def check_plan(self, plan: CachePlan) -> None:
        plan.check_model(self.family, self.num_layers)

    def to_dict(self) -> dict:
        return {
            "config": self.config_name,
            "family": self.family,
            "full_step_flops": self.full_step,
            "step_cached_flops": self.step_cached,
            "unit_flops": {b: {u: v.tolist() for u, v in units.items()} for b, units in self.units.items()},
            "step_elements": self.step_elements,
            "unit_elements": {b: {u: v.tolist() for u, v in us.items()} for b, us in self.unit_elements.items()},
        }


def profile_flops(config: ModelConfig) -> FlopProfile:
    family = get_family(config.family)
    model = config.build_transformer("meta")
    with MetaValues():  # the constant masks of the call keep their values for forwards that read them (Mochi)
        return _profile(config, family, model, config.example_call("meta"))


def _profile(config: ModelConfig, family, model, call) -> FlopProfile:
    handles, pre_head = pre_head_capture(family, model)  # H: the head's input, or the packed head streams
    sizes: dict[str, int] = {}  # module path -> elements of its output (the value a reuse keeps)
    for spec, layer, unit, _ in family.units_of(model):  # a unit some blocks lack (ReuseUnit.present) keeps nothing
        path = f"{spec.attr}.{layer}.{unit.submodules[-1]}"  # the passthrough's output when there is one
        handles.append(model.get_submodule(path).register_forward_hook(_record_size(sizes, path)))
    counter = flop_counter()
    with torch.no_grad(), counter:
        model(**call)
    for handle in handles:
        handle.remove()
    counts = {_strip_root(name): sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    full_step = float(counts.get("", 0))
    hidden = pre_head()

    head_counter = flop_counter()
    bound = TransformerCall(inspect.signature(model.forward), (), call)
    with torch.no_grad(), head_counter:
        family.run_head(model, hidden, bound)
    step_cached = float(sum(head_counter.get_flop_counts().get("Global", {}).values()))

    units = {}
    for spec in family.block_lists:
        blocks = len(getattr(model, spec.attr))
        units[spec.attr] = {
            unit.name: np.array(
                [
                    sum(counts.get(f"{spec.attr}.{layer}.{path}", 0) for path in unit.submodules)
                    for layer in range(blocks)
                ],
                dtype=np.float64,
            )
            for unit in spec.units
        }
    elements = {
        spec.attr: {
            unit.name: np.array(
                [
                    sizes.get(f"{spec.attr}.{layer}.{unit.submodules[-1]}", 0)
                    for layer in range(len(getattr(model, spec.attr)))
                ],
                dtype=np.float64,
            )
            for unit in spec.units
        }
        for spec in family.block_lists
    }
    num_layers = family.num_layers(model)
    step_elements = float(hidden.numel())
    return FlopProfile(config.name, config.family, num_layers, full_step, step_cached, units, step_elements, elements)


def _record_size(sizes: dict[str, int], path: str):
    def hook(module, args, output):
        tensors = [output] if torch.is_tensor(output) else [t for t in output if torch.is_tensor(t)]
        sizes[path] = sum(t.numel() for t in tensors)

    return hook


def _strip_root(name: str) -> str:
    # FlopCounterMode names modules "<RootClass>.<fqn>"; "Global" is the total.
    if name == "Global":
        return ""
    return name.split(".", 1)[1] if "." in name else "__root__"
