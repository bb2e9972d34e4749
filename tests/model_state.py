"""What ``invardiff.enable`` may touch on a model, captured so that a test can assert it is exactly as before."""

from __future__ import annotations

import torch


_MODULE_INTERNALS = ("_parameters", "_buffers", "_modules")  # compared through named_modules and the tensors


class ModelState:
    """Per module: its class, its instance attributes (diffusers hook registry by hook names, forward binding, every
    other attribute by identity), and a copy of every parameter and buffer."""

    def __init__(self, model: torch.nn.Module):
        self.modules = {name: (type(module), _attributes(module)) for name, module in model.named_modules()}
        self.tensors = {name: value.detach().clone() for name, value in model.state_dict(keep_vars=True).items()}

    def differences(self, other: ModelState) -> list[str]:
        found = []
        for name in sorted(set(self.modules) | set(other.modules)):
            if name not in self.modules or name not in other.modules:
                found.append(f"module {name!r} appeared or disappeared")
                continue
            (cls, attrs), (other_cls, other_attrs) = self.modules[name], other.modules[name]
            if cls is not other_cls:
                found.append(f"{name!r}: class {cls.__name__} became {other_cls.__name__} ({other_cls.__module__})")
            for key in sorted(set(attrs) | set(other_attrs)):
                if key not in attrs or key not in other_attrs or not _same(attrs[key], other_attrs[key]):
                    found.append(
                        f"{name!r}: attribute {key} {attrs.get(key, '<none>')} -> {other_attrs.get(key, '<none>')}"
                    )
        for name in sorted(set(self.tensors) | set(other.tensors)):
            if (
                name not in self.tensors
                or name not in other.tensors
                or not torch.equal(self.tensors[name], other.tensors[name])
            ):
                found.append(f"tensor {name!r} changed")
        return found


def _attributes(module: torch.nn.Module) -> dict:
    attributes = {}
    for key, value in vars(module).items():
        if key in _MODULE_INTERNALS:
            continue
        if key == "_diffusers_hook":
            value = ("hooks", tuple(value._hook_order))
        attributes[key] = value
    return attributes


def _same(a, b) -> bool:
    if isinstance(a, tuple) and a[:1] == ("hooks",):
        return a == b
    return a is b


def assert_unchanged(before: ModelState, model: torch.nn.Module) -> None:
    differences = before.differences(ModelState(model))
    assert not differences, "\n".join(differences[:20])
