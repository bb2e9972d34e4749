"""CallBinder binds a transformer call's arguments exactly as inspect.Signature.bind + apply_defaults does (the engine
binds every call with it), and raises bind's TypeError on calls bind refuses."""

import inspect

import pytest

from invardiff.families.spec import CallBinder, TransformerCall
from invardiff.model_configs import MODEL_CONFIGS


def forward(hidden_states, encoder_hidden_states=None, timestep=None, *, guidance=3.5, return_dict=True):
    pass


def forward_with_kwargs(hidden_states, timestep=None, **attention_kwargs):
    pass


def _bound(function, args, kwargs):
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


CALLS = [
    ((1,), {}),
    ((1, 2, 3), {}),
    ((1,), {"timestep": 5}),
    ((), {"hidden_states": 1, "guidance": None, "return_dict": False}),
    ((1, 2), {"return_dict": False, "timestep": 4}),
]


@pytest.mark.parametrize(("args", "kwargs"), CALLS)
def test_binds_as_signature_bind(args, kwargs):
    assert CallBinder(inspect.signature(forward)).bind(args, kwargs) == _bound(forward, args, kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((1, 2, 3, 4), {}), ((1,), {"hidden_states": 1}), ((), {"timestep": 1}), ((1,), {"unknown": 2})],
)
def test_refuses_what_signature_bind_refuses(args, kwargs):
    binder = CallBinder(inspect.signature(forward))
    with pytest.raises(TypeError) as expected:
        inspect.signature(forward).bind(*args, **kwargs)
    with pytest.raises(TypeError, match=str(expected.value)):
        binder.bind(args, kwargs)


def test_a_var_keyword_forward_goes_through_signature_bind():
    binder = CallBinder(inspect.signature(forward_with_kwargs))
    assert not binder.plain
    call = ((1,), {"timestep": 2, "scale": 0.5})
    assert binder.bind(*call) == _bound(forward_with_kwargs, *call)  # {'attention_kwargs': {'scale': 0.5}}


def test_a_real_transformer_call_binds_as_before():
    config = MODEL_CONFIGS["flux-tiny"]
    transformer, call = config.build_transformer(), config.example_call()
    signature = inspect.signature(transformer.forward)
    assert TransformerCall(CallBinder(signature), (), call).arguments == _bound(transformer.forward, (), call)
