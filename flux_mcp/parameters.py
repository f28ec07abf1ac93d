"""The flat tool parameters, defined once and shared by the eight task tools.

MCP tools take flat arguments (`lora_type`, `outpaint_left`, ...) while PiAPI nests them
(`lora_settings: [{lora_type}]`, `custom_settings: [{setting_type: "outpaint", ...}]`). This
module holds one `ToolParameter` per flat argument (its constraint type comes from
`flux_mcp.catalog`, its description for the model lives here), one `TaskTool` per task type
naming the parameters it takes, and `build_request`, the only translation from flat arguments
to a validated `TaskRequest`. The MCP layer turns these definitions into signatures; nothing
here knows about MCP.

Values equal to PiAPI's documented defaults (`denoise` 0.7, `batch_size` 1) are not sent, so a
payload says only what the caller chose.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from flux_mcp import catalog as c
from flux_mcp.errors import InvalidInputError
from flux_mcp.schemas import optional_input
from flux_mcp.settings import IncludeImage

REQUIRED: Any = ...


@dataclass(frozen=True)
class ToolParameter:
    key: str  # unique id of this definition
    name: str  # the argument name clients send (PiAPI's field name)
    annotation: Any
    default: Any = REQUIRED


def _p(name: str, type_: Any, description: str, default: Any = REQUIRED, *, key: str = "") -> ToolParameter:
    field = Field(description=description, json_schema_extra=optional_input)
    return ToolParameter(key or name, name, Annotated[type_, field], default)


_IMAGE_HELP = "URL, data: URI or local path."

PARAMETERS: dict[str, ToolParameter] = {
    p.key: p
    for p in (
        _p("model", c.ModelName, "schnell: fast, cheap; dev: better.", c.Model.SCHNELL.value),
        _p("prompt", c.Prompt, "What to generate."),
        _p("negative_prompt", c.NegativePrompt | None, "What to avoid.", None),
        _p("width", c.Dimension, "Pixels; width*height <= 1048576.", 1024),
        _p("height", c.Dimension, "Pixels.", 1024),
        _p("guidance_scale", c.GuidanceScale | None, "Prompt adherence; higher = stricter, less real.", None),
        _p("batch_size", c.BatchSize, "Images per task; schnell only; billed each.", 1),
        _p("denoise", c.Denoise, "How much to change the image.", c.DEFAULT_DENOISE),
        _p("image", c.ImageRef, f"Input image: {_IMAGE_HELP}"),
        _p(
            "image",
            c.ImageRef,
            "Image whose area to repaint is painted pure white (#FFFFFF): the mask. " + _IMAGE_HELP,
            key="inpaint_image",
        ),
        _p("lora_type", c.LoraName, "LoRA style."),
        _p("lora_type", c.LoraName | None, "Optional LoRA style.", None, key="optional_lora_type"),
        _p("lora_strength", c.LoraStrength, "LoRA weight.", 1.0),
        _p("control_type", c.ControlType, "Structure to follow."),
        _p("control_image", c.ImageRef, f"Control image: {_IMAGE_HELP}"),
        _p("control_strength", c.ControlStrength | None, "ControlNet weight; typical 0.45-0.7.", None),
        _p("return_preprocessed_image", bool, "Also return the control map.", False),
        _p("outpaint_left", c.OutpaintPixels, "Pixels to add on the left.", 0),
        _p("outpaint_right", c.OutpaintPixels, "Pixels to add on the right.", 0),
        _p("outpaint_top", c.OutpaintPixels, "Pixels to add on top.", 0),
        _p("outpaint_bottom", c.OutpaintPixels, "Pixels to add at the bottom.", 0),
        _p(
            "wait_seconds",
            Annotated[float, Field(ge=0, le=600)] | None,
            "Max seconds to wait.",
            None,
        ),
        _p("dry_run", bool, "Only validate and price it; send nothing.", False),
        _p("idempotency_key", str | None, "Same key = same task, no new charge.", None),
        _p("include_image", IncludeImage | None, "Inline preview.", None),
    )
}

COMMON_PARAMETERS: tuple[str, ...] = (
    "wait_seconds",
    "dry_run",
    "idempotency_key",
    "include_image",
)


@dataclass(frozen=True)
class TaskTool:
    name: str
    task_type: c.TaskType
    title: str
    description: str
    parameters: tuple[str, ...]

    @property
    def fixed_model(self) -> c.Model | None:
        """The model when the task type allows only one (then `model` is not a parameter)."""
        allowed = c.ALLOWED_MODELS[self.task_type]
        return allowed[0] if len(allowed) == 1 else None

    def all_parameters(self) -> list[ToolParameter]:
        names = (("model",) if self.fixed_model is None else ()) + self.parameters + COMMON_PARAMETERS
        return [PARAMETERS[n] for n in names]

    @cached_property
    def arguments_model(self) -> type[BaseModel]:
        """The tool's arguments as one pydantic model: its JSON schema is what tools/list
        publishes, and validating with it turns every bad argument into `InvalidInputError`."""
        fields: dict[str, Any] = {
            p.name: (p.annotation, ... if p.default is REQUIRED else p.default) for p in self.all_parameters()
        }
        # Strict: a boolean is a JSON boolean and an integer a JSON integer; "512", " 512 ", true
        # and 512.5 are refused, never coerced into something the caller did not send.
        config = ConfigDict(extra="forbid", strict=True)
        return create_model(f"{self.name}_arguments", __config__=config, **fields)

    def validate_arguments(self, arguments: Any) -> dict[str, Any]:
        return validate_arguments(self.arguments_model, arguments)


def validate_arguments(model: type[BaseModel], arguments: Any) -> dict[str, Any]:
    """Validate a tool's raw arguments strictly with its model, or raise `InvalidInputError`. For an
    optional argument (one whose default is "not given"), null and "" mean "not given": clients in
    strict function-calling modes send every property and these for the unset ones. An argument
    with a real default (width, batch_size, dry_run, ...) takes no null: a broken value must never
    quietly become the default of a paid call."""
    arguments = arguments if isinstance(arguments, dict) else {}
    optional = {name for name, field in model.model_fields.items() if field.default is None}
    given = {k: v for k, v in arguments.items() if not (k in optional and (v is None or v == ""))}
    try:
        return dict(model.model_validate(given).__dict__)  # the fields (extra ones are forbidden)
    except ValidationError as exc:
        raise InvalidInputError(c.describe_validation_error(exc)) from exc


# Prices come from the catalog ("$/image: schnell 0.0015, ..."), never restated here.
def _short(model: c.Model) -> str:
    return model.value.removeprefix("Qubico/flux1-")


_PRICES = "$/image: " + ", ".join(f"{_short(m)} {p:g}" for m, p in c.PRICE_PER_IMAGE_USD.items()) + "."
_ADV = f"${c.PRICE_PER_IMAGE_USD[c.Model.DEV_ADVANCED]:g}/image ({_short(c.Model.DEV_ADVANCED)})."
_TXT = ("prompt", "negative_prompt", "width", "height", "guidance_scale")
_IMG = ("prompt", "image", "negative_prompt", "denoise", "guidance_scale")

TASK_TOOLS: tuple[TaskTool, ...] = (
    TaskTool(
        "flux_txt2img", c.TaskType.TXT2IMG, "Flux text to image",
        f"Generate images from a text prompt. {_PRICES}",
        (*_TXT, "batch_size"),
    ),
    TaskTool(
        "flux_img2img", c.TaskType.IMG2IMG, "Flux image to image",
        f"Redraw an input image guided by a prompt. {_PRICES}",
        (*_IMG, "batch_size"),
    ),
    TaskTool(
        "flux_txt2img_lora", c.TaskType.TXT2IMG_LORA, "Flux text to image with a LoRA style",
        f"Generate from a prompt in a LoRA style. {_ADV}", (*_TXT, "lora_type", "lora_strength"),
    ),
    TaskTool(
        "flux_img2img_lora", c.TaskType.IMG2IMG_LORA, "Flux image to image with a LoRA style",
        f"Redraw an input image in a LoRA style. {_ADV}", (*_IMG, "lora_type", "lora_strength"),
    ),
    TaskTool(
        "flux_fill_inpaint", c.TaskType.FILL_INPAINT, "Flux inpaint",
        f"Repaint the area painted white in image (the mask) as the prompt describes. {_ADV}",
        ("prompt", "inpaint_image"),
    ),
    TaskTool(
        "flux_fill_outpaint", c.TaskType.FILL_OUTPAINT, "Flux outpaint",
        f"Extend an image beyond its borders; set at least one outpaint side > 0. {_ADV}",
        ("prompt", "image", "outpaint_left", "outpaint_right", "outpaint_top", "outpaint_bottom"),
    ),
    TaskTool(
        "flux_redux_variation", c.TaskType.REDUX_VARIATION, "Flux variation",
        f"Make a variation of an image, steered by the prompt. {_ADV}", ("prompt", "image"),
    ),
    TaskTool(
        "flux_controlnet_lora", c.TaskType.CONTROLNET_LORA, "Flux ControlNet",
        f"Generate following the structure (depth, edges, pose) of a control image, optionally with a LoRA. {_ADV}",
        (*_TXT, "control_type", "control_image", "control_strength", "return_preprocessed_image",
         "optional_lora_type", "lora_strength"),
    ),
)  # fmt: skip

TOOLS_BY_TASK_TYPE: dict[c.TaskType, TaskTool] = {t.task_type: t for t in TASK_TOOLS}


def _input_from_arguments(task_type: c.TaskType, args: dict[str, Any]) -> dict[str, Any]:
    """Flat tool arguments -> PiAPI's nested `input` object."""
    data: dict[str, Any] = {
        "prompt": args.get("prompt"),
        "negative_prompt": args.get("negative_prompt"),
        "image": args.get("image"),
        "guidance_scale": args.get("guidance_scale"),
    }
    if task_type in (c.TaskType.TXT2IMG, c.TaskType.TXT2IMG_LORA, c.TaskType.CONTROLNET_LORA):
        data["width"], data["height"] = args.get("width"), args.get("height")
    if args.get("denoise") is not None and args["denoise"] != c.DEFAULT_DENOISE:
        data["denoise"] = args["denoise"]
    if args.get("batch_size") is not None and args["batch_size"] != c.DEFAULT_BATCH_SIZE:
        data["batch_size"] = args["batch_size"]
    if args.get("lora_type"):
        data["lora_settings"] = [{"lora_type": args["lora_type"], "lora_strength": args.get("lora_strength")}]
    if task_type is c.TaskType.CONTROLNET_LORA:
        data["control_net_settings"] = [
            {
                "control_type": args.get("control_type"),
                "control_image": args.get("control_image"),
                "control_strength": args.get("control_strength"),
                "return_preprocessed_image": args.get("return_preprocessed_image") or None,
            }
        ]
    if task_type is c.TaskType.FILL_OUTPAINT:
        sides = ("outpaint_left", "outpaint_right", "outpaint_top", "outpaint_bottom")
        data["custom_settings"] = [{"setting_type": "outpaint", **{s: args.get(s) or 0 for s in sides}}]
    return {k: _drop_none(v) for k, v in data.items() if v is not None}


def _drop_none(value: Any) -> Any:
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def build_request(
    task_type: c.TaskType, args: dict[str, Any], *, config: dict[str, Any] | None = None
) -> c.TaskRequest:
    """Validate flat tool arguments into a `TaskRequest`, or raise `InvalidInputError`.

    `config` is PiAPI's per-task `config` (service mode, webhook): a deployment setting
    (`Settings.piapi_config`), not a tool argument."""
    tool = TOOLS_BY_TASK_TYPE[task_type]
    # The tool's defaults apply here too, so library callers get exactly what a tool call sends.
    args = {p.name: p.default for p in tool.all_parameters() if p.default is not REQUIRED} | args
    model = tool.fixed_model or args.get("model") or c.Model.SCHNELL
    try:
        return c.TaskRequest.model_validate(
            {
                "model": model,
                "task_type": task_type,
                "input": _input_from_arguments(task_type, args),
                "config": config or None,
            }
        )
    except ValidationError as exc:
        raise InvalidInputError(c.describe_validation_error(exc)) from exc
