"""A pre-head state of several streams (``FamilySpec.head_streams``, LTX-2's video and audio): the packing itself,
and the engine on a hand-made two-stream toy whose every value can be written down.

The toy: a video stream ``v`` (B, 2, 2) and an audio stream ``a`` (B, 3, 1); each of its blocks adds 1 to every
video token and 10 to every audio token (through units ``vff`` / ``aff``) and returns ``(v, a)``; the heads return
``2 v + t`` and ``3 a - t``. So after its 2 blocks, H = (v + 2, a + 20) and the residual H - x is (2, 20) at
every step.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

import invardiff
import invardiff.families.table as family_table
from invardiff import ModelFacts
from invardiff.families import BlockListSpec, FamilySpec, ReuseUnit, SpecError
from invardiff.families.spec import BlockOutputs, HeadStreams, describe_block_outputs

from helpers import plan_from_bits


class _Constant(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x, self.value)


class _Scale(torch.nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return self.factor * x


class TwoStreamBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vff, self.aff = _Constant(1.0), _Constant(10.0)

    def forward(self, video, audio):
        return video + self.vff(video), audio + self.aff(audio)


describe_block_outputs(TwoStreamBlock, BlockOutputs(0, 1, "video", "audio"))


class TwoStreamToy(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, num_layers: int = 2):
        super().__init__()
        self.blocks = torch.nn.ModuleList(TwoStreamBlock() for _ in range(num_layers))
        self.video_head, self.audio_head = _Scale(2.0), _Scale(3.0)

    def head(self, video, audio, timestep):
        t = timestep[:, None, None]
        return self.video_head(video) + t, self.audio_head(audio) - t

    def forward(self, video, audio, timestep):
        for block in self.blocks:
            video, audio = block(video, audio)
        return self.head(video, audio, timestep)


STREAMS = HeadStreams(outputs=(0, 1), arguments=("video", "audio"), modules=("video_head", "audio_head"),
                      latents=("video", "audio"))  # fmt: skip


def _run_head(transformer, hidden, call):
    video, audio = STREAMS.unpack(hidden, [call["video"].shape[1:], call["audio"].shape[1:]])
    return transformer.head(video, audio, call["timestep"])


TWO_STREAMS = FamilySpec(
    name="toy-two-streams",
    transformer_class=TwoStreamToy,
    block_lists=(
        BlockListSpec(
            attr="blocks",
            module_kinds=("vff", "aff"),
            units=(ReuseUnit("vff", ("vff",), "vff"), ReuseUnit("aff", ("aff",), "aff")),
            image_output=0,
        ),
    ),
    head_input="video_head",
    head_streams=STREAMS,
    timestep_scale=1.0,
    run_head=_run_head,
    input_signature=lambda call: (tuple(call["video"].shape), tuple(call["audio"].shape)),
    embed_input=lambda transformer, call: STREAMS.pack([call["video"], call["audio"]]),
    latent_arg="video",
)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(family_table._FAMILIES, TWO_STREAMS.name, TWO_STREAMS)  # gone after the test
    return TwoStreamToy().eval()


def _call(video: float, audio: float, t: float) -> dict:
    streams = {"video": torch.full((1, 2, 2), video), "audio": torch.full((1, 3, 1), audio)}
    return {**streams, "timestep": torch.tensor([t])}


def _run(model, calls):
    outputs = []
    for step, call in enumerate(calls):
        with invardiff.cache_context(model, "default", step_index=step):
            outputs.append(model(**call))
    return outputs


def test_pack_flattens_each_stream_per_sample_and_unpack_inverts_it():
    video = torch.arange(12.0).view(2, 2, 3)  # (B, N_v, D_v)
    audio = 100 + torch.arange(4.0).view(2, 1, 2)  # (B, N_a, D_a)
    packed = STREAMS.pack([video, audio])
    assert packed.tolist() == [
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 101.0],
        [6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 102.0, 103.0],
    ]
    back = STREAMS.unpack(packed, [(2, 3), (1, 2)])
    assert torch.equal(back[0], video) and torch.equal(back[1], audio)
    rows = STREAMS.unpack(packed[1:], [(2, 3), (1, 2)])  # a row of the packed state is that sample's streams
    assert torch.equal(rows[0], video[1:]) and torch.equal(rows[1], audio[1:])
    with pytest.raises(ValueError, match=r"8 elements per sample does not hold streams of shapes \[\(2, 2\)"):
        STREAMS.unpack(packed, [(2, 2), (1, 2)])


def test_head_streams_need_one_entry_per_stream():
    with pytest.raises(ValueError, match="one output index, block argument, head module and latent argument"):
        dataclasses.replace(STREAMS, modules=("video_head",))


@pytest.mark.parametrize(
    ("step_reuse", "video", "audio"),
    [
        ("state", 2 * 2.0 + 0.25, 3 * 21.0 - 0.25),  # the kept H of step 0, (2, 21), through step 1's heads
        ("residual", 2 * (5.0 + 2) + 0.25, 3 * (7.0 + 20) - 0.25),  # step 1's input (5, 7) plus R = (2, 20)
    ],
)
def test_a_step_cached_step_runs_both_heads_on_the_kept_packed_state(toy, step_reuse, video, audio):
    calls = [_call(0.0, 1.0, 0.5), _call(5.0, 7.0, 0.25)]
    facts = ModelFacts.for_family(TWO_STREAMS.name, {"blocks": 2})
    with invardiff.enabled(toy, invardiff.PlanConfig(plan_from_bits(facts, "01"), step_reuse=step_reuse)):
        first, second = _run(toy, calls)
        status = invardiff.summary(toy).branches["default"].step_status.tolist()
    assert status == [0, 1]  # step 1 was step-cached
    assert torch.equal(first[0], torch.full((1, 2, 2), 2 * 2.0 + 0.5))  # computed: v + 2, a + 20
    assert torch.equal(first[1], torch.full((1, 3, 1), 3 * 21.0 - 0.5))
    assert torch.equal(second[0], torch.full((1, 2, 2), video))
    assert torch.equal(second[1], torch.full((1, 3, 1), audio))


def test_dicache_replaces_both_streams_before_the_first_head_runs(toy):
    # Three blocks, the probe after the first: on a skipped step the last two blocks pass (v + 1, a + 10) through,
    # and DiCache's extrapolated packed state x + R = (v + 3, a + 30) (R is the same at every step) must reach both
    # heads, the video head included, which runs before the audio one.
    model = TwoStreamToy(num_layers=3).eval()
    calls = [_call(float(step), 2.0 * step, 1.0 - step / 6) for step in range(6)]
    stock = [model(**call) for call in calls]
    config = invardiff.DiCacheConfig(threshold=100.0, num_inference_steps=6, probe_depth=1, warmup_ratio=0.3)
    with invardiff.enabled(model, config):
        outputs = _run(model, calls)
        decisions = invardiff.summary(model).branches["default"].to_dict()["probe"]["decision"]
    assert [row[0] for row in decisions].count("skipped") >= 2  # the deep blocks did not run there
    for (video, audio), (stock_video, stock_audio) in zip(outputs, stock, strict=True):
        assert torch.equal(video, stock_video) and torch.equal(audio, stock_audio)


def test_streams_packed_in_another_order_than_run_head_reads_them_fail_the_head_check(monkeypatch):
    # The spec packs audio first while run_head unpacks video first: a step-cached step would feed each head the
    # other stream's values. The engine's head check at the first computed call names it.
    swapped = dataclasses.replace(
        TWO_STREAMS,
        name="toy-two-streams-swapped",
        head_streams=HeadStreams((1, 0), ("audio", "video"), ("audio_head", "video_head"), ("video", "audio")),
    )
    monkeypatch.setitem(family_table._FAMILIES, swapped.name, swapped)
    model = TwoStreamToy().eval()
    facts = ModelFacts.for_family(swapped.name, {"blocks": 2})
    with invardiff.enabled(model, plan_from_bits(facts, "01")):
        with pytest.raises(SpecError, match="does not reproduce") as error:
            _run(model, [_call(0.0, 1.0, 0.5)])
    assert error.value.check == "head-input-state"
