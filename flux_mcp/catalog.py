"""What PiAPI's Flux task API accepts: the single source of truth.

Every limit the API documents lives here once, as an `Annotated` type (`GuidanceScale`,
`Denoise`, ...). The PiAPI-shaped input models below are built from those types, and so are
the flat MCP tool parameters in `flux_mcp.parameters`, so a limit changed here changes the
request validation, the simulator and every tool's JSON schema together.

Validation happens entirely before any HTTP request: `TaskRequest` checks field ranges, the
model x task-type matrix, the schnell-only `batch_size` and the LoRA / ControlNet counts, and
`to_payload()` produces exactly the JSON body PiAPI documents (no nulls, no extra keys).
Where the documentation is silent (LoRA and ControlNet strength ranges) the ranges are the
ones public clients use; see `piapi-flux-api.md` for the provenance of each value.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)


class Model(StrEnum):
    SCHNELL = "Qubico/flux1-schnell"
    DEV = "Qubico/flux1-dev"
    DEV_ADVANCED = "Qubico/flux1-dev-advanced"


class TaskType(StrEnum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    TXT2IMG_LORA = "txt2img-lora"
    IMG2IMG_LORA = "img2img-lora"
    FILL_INPAINT = "fill-inpaint"
    FILL_OUTPAINT = "fill-outpaint"
    REDUX_VARIATION = "redux-variation"
    CONTROLNET_LORA = "controlnet-lora"


ALL_MODELS: tuple[Model, ...] = tuple(Model)
ModelName = Literal["Qubico/flux1-schnell", "Qubico/flux1-dev", "Qubico/flux1-dev-advanced"]  # inline enum in schemas

# "Qubico/flux1-dev-advanced is the only model that supports LoRA and controlnet" and "the only
# model that supports fill-inpaint, fill-outpaint and redux-variation"; txt2img/img2img on all three.
ALLOWED_MODELS: dict[TaskType, tuple[Model, ...]] = {
    TaskType.TXT2IMG: ALL_MODELS,
    TaskType.IMG2IMG: ALL_MODELS,
    **{t: (Model.DEV_ADVANCED,) for t in TaskType if t not in (TaskType.TXT2IMG, TaskType.IMG2IMG)},
}

# USD per generated image (PiAPI pricing page, 2025-26). batch_size multiplies the price.
PRICE_PER_IMAGE_USD: dict[Model, float] = {
    Model.SCHNELL: 0.0015,
    Model.DEV: 0.015,
    Model.DEV_ADVANCED: 0.02,
}

# The 21 names of PiAPI's "Available LoRA" table (their spelling, typos included) plus the two
# seen in PiAPI's own examples (`remes-abstract-poster-style`) and official server (`mystic-realism`).
LORA_TYPES: tuple[str, ...] = (
    "anime", "art", "disney", "furry", "mjv6", "realism", "scenery",
    "collage-artstyle", "creepcute", "cyberpunk-anime-style", "deco-pulse",
    "deep-sea-particle-enhencer", "faetastic-details", "fractal-geometry",
    "galactixy-illustrations-style", "geometric-woman", "graphic-portrait", "mat-miller-art",
    "moebius-style", "ob3d-isometric-3d-room", "paper-quilling-and-layering-style",
    "remes-abstract-poster-style", "mystic-realism",
)  # fmt: skip
LoraName = Literal[LORA_TYPES]  # type: ignore[valid-type]

CONTROL_TYPES: tuple[str, ...] = ("depth", "canny", "soft_edge", "openpose")
ControlType = Literal[CONTROL_TYPES]  # type: ignore[valid-type]

MAX_PIXELS = 1024 * 1024  # "width*height cannot exceed 1048576"
MAX_BATCH_SIZE = 4
DEFAULT_DENOISE = 0.7
DEFAULT_BATCH_SIZE = 1

# --- one definition per documented limit (descriptions for models live in flux_mcp.parameters) --


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or blank")
    return value


def check_http_url(value: str) -> str:
    """An absolute http(s) URL with a host (and, if given, a valid port); nothing else passes."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme.lower() not in ("http", "https")
        or not parts.hostname
        or any(ch.isspace() or ord(ch) < 32 for ch in value)
    ):
        raise ValueError("must be an absolute http:// or https:// URL with a host")
    return value


Prompt = Annotated[str, AfterValidator(_not_blank)]
HttpUrlText = Annotated[str, AfterValidator(check_http_url)]
NegativePrompt = str
GuidanceScale = Annotated[float, Field(ge=1.5, le=5)]
Denoise = Annotated[float, Field(gt=0, le=1)]
Dimension = Annotated[int, Field(gt=0)]  # the real limit is the product, checked by `_Sized`
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)]
ImageRef = Annotated[str, StringConstraints(min_length=1)]
# No range is documented for the two strengths; these are the ranges public clients use.
LoraStrength = Annotated[float, Field(gt=0, le=2)]
ControlStrength = Annotated[float, Field(gt=0, le=1)]
OutpaintPixels = Annotated[int, Field(ge=0, le=MAX_PIXELS)]
ServiceMode = Literal["public", "private"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- settings objects inside `input` ---------------------------------------------------------


class LoraSetting(_Strict):
    lora_type: LoraName
    lora_strength: LoraStrength | None = None


class ControlNetSetting(_Strict):
    control_type: ControlType
    control_image: ImageRef
    control_strength: ControlStrength | None = None
    return_preprocessed_image: bool | None = None


class OutpaintSetting(_Strict):
    setting_type: Literal["outpaint"] = "outpaint"
    outpaint_left: OutpaintPixels = 0
    outpaint_right: OutpaintPixels = 0
    outpaint_top: OutpaintPixels = 0
    outpaint_bottom: OutpaintPixels = 0

    @model_validator(mode="after")
    def _expands_somewhere(self) -> OutpaintSetting:
        deltas = (self.outpaint_left, self.outpaint_right, self.outpaint_top, self.outpaint_bottom)
        if not any(deltas):
            raise ValueError("at least one of outpaint_left/right/top/bottom must be > 0")
        if sum(deltas) >= MAX_PIXELS:
            raise ValueError("the total outpaint delta must be less than 1048576 pixels")
        return self


# --- `input` per task type, assembled from small mixins -------------------------------------


class TaskInput(_Strict):
    prompt: Prompt


class _Negative(BaseModel):
    # Documented for the txt2img/img2img families and ControlNet; not for fill or redux.
    negative_prompt: NegativePrompt | None = None


class _Sized(BaseModel):
    width: Dimension | None = None
    height: Dimension | None = None

    @model_validator(mode="after")
    def _pixel_budget(self) -> Any:
        if self.width is not None and self.height is not None and self.width * self.height > MAX_PIXELS:
            raise ValueError(
                f"width*height = {self.width * self.height} exceeds PiAPI's limit of {MAX_PIXELS} "
                "pixels (e.g. 1024x1024, 1344x768, 768x1344)"
            )
        return self


class _Guided(BaseModel):
    guidance_scale: GuidanceScale | None = None


class _Batched(BaseModel):
    batch_size: BatchSize | None = None


class _FromImage(BaseModel):
    image: ImageRef


class _Denoised(BaseModel):
    denoise: Denoise | None = None


class _OneLora(BaseModel):
    lora_settings: Annotated[list[LoraSetting], Field(min_length=1, max_length=1)]


class Txt2ImgInput(_Batched, _Guided, _Sized, _Negative, TaskInput):
    pass


class Img2ImgInput(_Batched, _Guided, _Denoised, _Negative, _FromImage, TaskInput):
    pass


class Txt2ImgLoraInput(_OneLora, _Guided, _Sized, _Negative, TaskInput):
    pass


class Img2ImgLoraInput(_OneLora, _Guided, _Denoised, _Negative, _FromImage, TaskInput):
    pass


class FillInpaintInput(_FromImage, TaskInput):
    """`image` carries the mask: the area to repaint is painted pure white in the image itself."""


class FillOutpaintInput(_FromImage, TaskInput):
    custom_settings: Annotated[list[OutpaintSetting], Field(min_length=1, max_length=1)]


class ReduxVariationInput(_FromImage, TaskInput):
    pass


class ControlNetLoraInput(_Guided, _Sized, _Negative, TaskInput):
    control_net_settings: Annotated[list[ControlNetSetting], Field(min_length=1, max_length=1)]
    lora_settings: Annotated[list[LoraSetting], Field(max_length=1)] | None = None


INPUT_MODELS: dict[TaskType, type[TaskInput]] = {
    TaskType.TXT2IMG: Txt2ImgInput,
    TaskType.IMG2IMG: Img2ImgInput,
    TaskType.TXT2IMG_LORA: Txt2ImgLoraInput,
    TaskType.IMG2IMG_LORA: Img2ImgLoraInput,
    TaskType.FILL_INPAINT: FillInpaintInput,
    TaskType.FILL_OUTPAINT: FillOutpaintInput,
    TaskType.REDUX_VARIATION: ReduxVariationInput,
    TaskType.CONTROLNET_LORA: ControlNetLoraInput,
}


# --- `config` ----------------------------------------------------------------------------------


class WebhookConfig(_Strict):
    endpoint: HttpUrlText
    secret: str = ""


class TaskConfig(_Strict):
    webhook_config: WebhookConfig | None = None
    service_mode: ServiceMode | None = None


# --- the whole request -----------------------------------------------------------------------


class TaskRequest(_Strict):
    model: Model
    task_type: TaskType
    input: SerializeAsAny[TaskInput]
    config: TaskConfig | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _typed_input(cls, value: Any, info: Any) -> Any:
        task_type = info.data.get("task_type")
        if task_type is None or isinstance(value, INPUT_MODELS[task_type]):
            return value
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_none=True)
        return INPUT_MODELS[task_type].model_validate(value)

    @model_validator(mode="before")
    @classmethod
    def _model_supports_task(cls, data: Any) -> Any:
        # Checked before `input`, so a wrong model is reported first, not a missing field.
        if isinstance(data, dict):
            try:
                model, task_type = Model(data.get("model")), TaskType(data.get("task_type"))
            except ValueError:
                return data  # the field validators name the bad value
            allowed = ALLOWED_MODELS[task_type]
            if model not in allowed:
                names = ", ".join(m.value for m in allowed)
                raise ValueError(f"task_type {task_type.value!r} runs only on {names}, not {model.value}")
        return data

    @model_validator(mode="after")
    def _batch_only_on_schnell(self) -> TaskRequest:
        batch = getattr(self.input, "batch_size", None)
        if batch is not None and batch > 1 and self.model is not Model.SCHNELL:
            raise ValueError(f"batch_size > 1 works only on {Model.SCHNELL.value}, not {self.model.value}")
        return self

    @property
    def image_count(self) -> int:
        return getattr(self.input, "batch_size", None) or DEFAULT_BATCH_SIZE

    @property
    def estimated_cost_usd(self) -> float:
        return round(PRICE_PER_IMAGE_USD[self.model] * self.image_count, 6)

    def to_payload(self) -> dict[str, Any]:
        """The exact JSON body for `POST /api/v1/task`: no nulls, no keys PiAPI does not define."""
        return self.model_dump(mode="json", exclude_none=True)


def expected_images(payload: dict[str, Any]) -> int:
    """How many images a task created with `payload` may return: its batch size, plus the control
    map when ControlNet was asked for it. For a payload we do not know, the most any task returns."""
    data = payload.get("input") if isinstance(payload, dict) else None
    if not isinstance(data, dict):
        return MAX_BATCH_SIZE + 1
    count = data.get("batch_size") if isinstance(data.get("batch_size"), int) else DEFAULT_BATCH_SIZE
    controls = data.get("control_net_settings")
    if isinstance(controls, list) and any(isinstance(c, dict) and c.get("return_preprocessed_image") for c in controls):
        count += 1
    return max(1, count)


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, naming the field, the rule and the allowed values."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if p not in ("input",) and not isinstance(p, int))
        loc = loc.removeprefix("function-after[").split("[")[0] if loc.startswith("function") else loc
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "is not a parameter of this task type"
        if err["type"] in ("literal_error", "enum"):
            msg += f" (got {err['input']!r})"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)
