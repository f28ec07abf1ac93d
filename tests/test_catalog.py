"""The catalog and flat parameters: exact PiAPI payloads, and every documented limit enforced."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux_mcp import catalog as c
from flux_mcp.errors import InvalidInputError
from flux_mcp.parameters import PARAMETERS, TASK_TOOLS, build_request

URL = "https://i.ibb.co/TH7xMvd/girl-mask.png"
ADV = "Qubico/flux1-dev-advanced"

# One case per task type: flat tool arguments -> the exact body PiAPI documents.
EXACT_PAYLOADS = [
    (
        c.TaskType.TXT2IMG,
        {"model": "Qubico/flux1-dev", "prompt": "a little cat", "width": 1024, "height": 1024},
        {"model": "Qubico/flux1-dev", "task_type": "txt2img",
         "input": {"prompt": "a little cat", "width": 1024, "height": 1024}},
    ),
    (
        c.TaskType.IMG2IMG,
        {"model": "Qubico/flux1-schnell", "prompt": "a bear", "image": "https://i.ibb.co/J7ZNgSG/01.jpg",
         "denoise": 0.7, "batch_size": 1,
         "config": {"webhook_config": {"endpoint": "https://webhook.site/xxxx", "secret": ""}}},
        {"model": "Qubico/flux1-schnell", "task_type": "img2img",
         "input": {"prompt": "a bear", "image": "https://i.ibb.co/J7ZNgSG/01.jpg"},
         "config": {"webhook_config": {"endpoint": "https://webhook.site/xxxx", "secret": ""}}},
    ),
    (
        c.TaskType.TXT2IMG_LORA,
        {"prompt": "spiderman", "lora_type": "mjv6", "width": 1024, "height": 1024},
        {"model": ADV, "task_type": "txt2img-lora",
         "input": {"prompt": "spiderman", "width": 1024, "height": 1024,
                   "lora_settings": [{"lora_type": "mjv6", "lora_strength": 1.0}]}},
    ),
    (
        c.TaskType.IMG2IMG_LORA,
        {"prompt": "anime", "image": URL, "lora_type": "anime", "lora_strength": 0.8, "denoise": 0.5},
        {"model": ADV, "task_type": "img2img-lora",
         "input": {"prompt": "anime", "image": URL, "denoise": 0.5,
                   "lora_settings": [{"lora_type": "anime", "lora_strength": 0.8}]}},
    ),
    (
        c.TaskType.FILL_INPAINT,
        {"prompt": "a girl in blue and red skirt", "image": URL},
        {"model": ADV, "task_type": "fill-inpaint", "input": {"prompt": "a girl in blue and red skirt", "image": URL}},
    ),
    (
        c.TaskType.FILL_OUTPAINT,
        {"prompt": "a girl in a great grass sea", "image": URL, "outpaint_left": 500, "outpaint_right": 500},
        {"model": ADV, "task_type": "fill-outpaint",
         "input": {"prompt": "a girl in a great grass sea", "image": URL,
                   "custom_settings": [{"setting_type": "outpaint", "outpaint_left": 500, "outpaint_right": 500,
                                        "outpaint_top": 0, "outpaint_bottom": 0}]}},
    ),
    (
        c.TaskType.REDUX_VARIATION,
        {"prompt": "a superman", "image": URL, "config": {"service_mode": "public"}},
        {"model": ADV, "task_type": "redux-variation", "input": {"prompt": "a superman", "image": URL},
         "config": {"service_mode": "public"}},
    ),
    (
        c.TaskType.CONTROLNET_LORA,
        {"prompt": "A girl in city", "negative_prompt": "low quality", "guidance_scale": 2.5,
         "control_type": "canny", "control_image": URL, "control_strength": 0.45,
         "return_preprocessed_image": True, "lora_type": "graphic-portrait", "lora_strength": 1},
        {"model": ADV, "task_type": "controlnet-lora",
         "input": {"prompt": "A girl in city", "negative_prompt": "low quality", "guidance_scale": 2.5,
                   "width": 1024, "height": 1024,
                   "control_net_settings": [{"control_type": "canny", "control_image": URL,
                                             "control_strength": 0.45, "return_preprocessed_image": True}],
                   "lora_settings": [{"lora_type": "graphic-portrait", "lora_strength": 1.0}]}},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("task_type", "args", "payload"), EXACT_PAYLOADS, ids=lambda v: str(v)[:20])
def test_each_task_type_builds_the_exact_documented_payload(task_type, args, payload):
    args = dict(args)
    config = args.pop("config", None)  # a deployment setting (Settings.piapi_config), not a tool argument
    assert build_request(task_type, args, config=config).to_payload() == payload


def test_every_task_type_has_a_payload_case_and_a_tool():
    assert {case[0] for case in EXACT_PAYLOADS} == set(c.TaskType)
    assert {t.task_type for t in TASK_TOOLS} == set(c.TaskType)


@pytest.mark.parametrize(
    ("task_type", "args", "expected"),
    [
        (c.TaskType.TXT2IMG, {"prompt": ""}, "prompt: must not be empty"),
        (c.TaskType.TXT2IMG, {"prompt": "   "}, "prompt: must not be empty"),
        (c.TaskType.TXT2IMG, {"prompt": "x", "guidance_scale": 1.4}, "guidance_scale: Input should be greater"),
        (c.TaskType.TXT2IMG, {"prompt": "x", "guidance_scale": 5.1}, "guidance_scale: Input should be less"),
        (c.TaskType.IMG2IMG, {"prompt": "x", "image": URL, "denoise": 0}, "denoise: Input should be greater than 0"),
        (c.TaskType.IMG2IMG, {"prompt": "x", "image": URL, "denoise": 1.01}, "denoise: Input should be less"),
        (c.TaskType.TXT2IMG, {"prompt": "x", "width": 2048, "height": 1024}, "exceeds PiAPI's limit of 1048576"),
        (c.TaskType.TXT2IMG, {"prompt": "x", "width": 0, "height": 1024}, "width: Input should be greater than 0"),
        (c.TaskType.TXT2IMG, {"prompt": "x", "batch_size": 5}, "batch_size: Input should be less than or equal to 4"),
        (c.TaskType.TXT2IMG, {"prompt": "x", "batch_size": 0}, "batch_size: Input should be greater"),
        (c.TaskType.TXT2IMG, {"prompt": "x", "model": "Qubico/flux1-dev", "batch_size": 2},
         "batch_size > 1 works only on Qubico/flux1-schnell"),
        (c.TaskType.TXT2IMG, {"prompt": "x", "model": "Qubico/flux2"}, "model: Input should be"),
        (c.TaskType.TXT2IMG_LORA, {"prompt": "x", "lora_type": "creepycute"}, "'creepcute'"),
        (c.TaskType.TXT2IMG_LORA, {"prompt": "x", "lora_type": "mjv6", "lora_strength": 3}, "lora_strength"),
        (c.TaskType.CONTROLNET_LORA, {"prompt": "x", "control_type": "hed", "control_image": URL},
         "'depth', 'canny', 'soft_edge' or 'openpose'"),
        (c.TaskType.CONTROLNET_LORA, {"prompt": "x", "control_type": "depth", "control_image": URL,
                                      "control_strength": 1.5}, "control_strength"),
        (c.TaskType.FILL_OUTPAINT, {"prompt": "x", "image": URL}, "at least one of outpaint_left/right/top/bottom"),
        (c.TaskType.FILL_OUTPAINT, {"prompt": "x", "image": URL, "outpaint_left": -1}, "outpaint_left"),
        (c.TaskType.IMG2IMG, {"prompt": "x"}, "image: Field required"),
    ],
)  # fmt: skip
def test_documented_limits_are_rejected_with_the_field_and_rule(task_type, args, expected):
    with pytest.raises(InvalidInputError) as info:
        build_request(task_type, args)
    assert expected in info.value.message
    assert info.value.category == "invalid_input" and not info.value.retryable


@pytest.mark.parametrize("task_type", [t for t in c.TaskType if t not in (c.TaskType.TXT2IMG, c.TaskType.IMG2IMG)])
@pytest.mark.parametrize("model", ["Qubico/flux1-schnell", "Qubico/flux1-dev"])
def test_advanced_only_task_types_refuse_other_models(task_type, model):
    with pytest.raises(Exception, match="runs only on Qubico/flux1-dev-advanced"):
        c.TaskRequest(model=model, task_type=task_type, input={"prompt": "x"})


def test_controlnet_takes_exactly_one_controlnet_and_at_most_one_lora():
    base = {"prompt": "x"}
    with pytest.raises(Exception, match="control_net_settings"):
        c.TaskRequest(model=ADV, task_type="controlnet-lora", input=base)
    two = [{"control_type": "depth", "control_image": URL}] * 2
    with pytest.raises(Exception, match="control_net_settings"):
        c.TaskRequest(model=ADV, task_type="controlnet-lora", input={**base, "control_net_settings": two})
    one = two[:1]
    loras = [{"lora_type": "art"}, {"lora_type": "anime"}]
    with pytest.raises(Exception, match="lora_settings"):
        c.TaskRequest(model=ADV, task_type="controlnet-lora", input={**base, "control_net_settings": one,
                                                                     "lora_settings": loras})  # fmt: skip
    ok = c.TaskRequest(model=ADV, task_type="controlnet-lora", input={**base, "control_net_settings": one})
    assert "lora_settings" not in ok.to_payload()["input"]


def test_lora_catalog_has_the_documented_names_and_the_two_example_names():
    assert len(c.LORA_TYPES) == 23 and len(set(c.LORA_TYPES)) == 23
    assert {"creepcute", "deep-sea-particle-enhencer", "remes-abstract-poster-style", "mystic-realism"} <= set(
        c.LORA_TYPES
    )


def test_price_estimate_multiplies_by_batch():
    request = build_request(c.TaskType.TXT2IMG, {"prompt": "x", "batch_size": 4})
    assert request.estimated_cost_usd == pytest.approx(0.006)
    assert build_request(c.TaskType.FILL_INPAINT, {"prompt": "x", "image": URL}).estimated_cost_usd == 0.02


def test_each_tool_exposes_only_the_fields_its_task_type_takes():
    names = {t.name: {p.name for p in t.all_parameters()} for t in TASK_TOOLS}
    assert "width" not in names["flux_img2img"] and "denoise" not in names["flux_txt2img"]
    assert "batch_size" not in names["flux_txt2img_lora"] and "model" not in names["flux_fill_inpaint"]
    assert {"outpaint_left", "outpaint_bottom"} <= names["flux_fill_outpaint"]
    assert "lora_type" in names["flux_controlnet_lora"] and "image" not in names["flux_controlnet_lora"]
    assert all(p.annotation is not None for p in PARAMETERS.values())


@given(
    width=st.integers(min_value=-10, max_value=5000),
    height=st.integers(min_value=-10, max_value=5000),
    guidance=st.floats(min_value=-10, max_value=20, allow_nan=False),
)
def test_size_and_guidance_are_accepted_exactly_when_within_the_documented_limits(width, height, guidance):
    args = {"prompt": "x", "width": width, "height": height, "guidance_scale": guidance}
    valid = width > 0 and height > 0 and width * height <= c.MAX_PIXELS and 1.5 <= guidance <= 5
    try:
        payload = build_request(c.TaskType.TXT2IMG, args).to_payload()
    except InvalidInputError:
        assert not valid
    else:
        assert valid
        assert payload["input"]["width"] * payload["input"]["height"] <= c.MAX_PIXELS


@given(st.dictionaries(st.sampled_from(["denoise", "batch_size", "lora_strength"]), st.floats(-5, 10)))
def test_payloads_never_contain_nulls(extra):
    args = {"prompt": "x", "image": URL, "lora_type": "art", **extra}
    try:
        payload = build_request(c.TaskType.IMG2IMG_LORA, args).to_payload()
    except InvalidInputError:
        return

    def walk(value):
        assert value is not None
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        if isinstance(value, list):
            for v in value:
                walk(v)

    walk(payload)
