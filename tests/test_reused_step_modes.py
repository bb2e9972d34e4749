"""A step-cached (reused) step runs no unit and sets no adapter mode: between calls every adapted module is INACTIVE
(the stock forward, and the bypass check's premise), and only computed steps call the units."""

import invardiff
from invardiff.engine.adapters import INACTIVE, MODE
from invardiff.model_configs import MODEL_CONFIGS

from helpers import facts_for, plan_from_bits, run_pipeline, tiny_pipeline


def test_a_reused_step_calls_no_unit_and_every_module_is_inactive_between_calls():
    config = MODEL_CONFIGS["flux-tiny"]
    _, pipe = tiny_pipeline("flux")
    step_cache = "011010"  # steps 1, 2 and 4 reuse the cached pre-head state
    plan = plan_from_bits(facts_for(pipe.transformer, "flux"), step_cache)
    with invardiff.enabled(pipe, plan):
        adapted = [module for module in pipe.transformer.modules() if hasattr(type(module), "_invardiff_base")]
        calls, modes = [0] * len(step_cache), []
        step = [0]

        def count(module, args):
            calls[step[0]] += 1

        handles = [module.register_forward_pre_hook(count) for module in adapted]

        def at_step_end(pipeline, index, timestep, callback_kwargs):
            modes.append({module.__dict__[MODE] for module in adapted})
            step[0] = index + 1
            return callback_kwargs

        run_pipeline(pipe, config, len(step_cache), callback_on_step_end=at_step_end)
        for handle in handles:
            handle.remove()
    assert adapted  # the plan policy adapts every unit
    assert modes == [{INACTIVE}] * len(step_cache)
    assert [count == 0 for count in calls] == [bit == "1" for bit in step_cache]
    assert calls[0] == calls[3] == calls[5] == len(adapted)  # a computed step calls every unit once
