"""What the framework adapters (LlamaIndex, LangChain) share: option checks, the engine they use, its identity.

Both adapters accept either loading options (``model``, ``device``, ``dtype``, ``batch_size``,
``max_length``, ``template``, ``instruction``, ``trust_remote_code`` and the ``engine_kwargs`` escape hatch,
all passed to :meth:`R2RReranker.from_pretrained`) or an already loaded ``reranker`` to share, and an optional
fixed ``expert``. ``max_length=None`` (their default) is the length the bundle's experts were trained at, else
512 (:func:`r2r_core.reranker.resolve_max_length`). Without ``reranker=``, engines come from
:func:`r2r_core.engines.shared_engine`, so adapters with equal loading options share one. With it, the adapter's
loading fields are set from the engine (:func:`engine_options`), so serialising the adapter says what it really
runs. Those fields, their checks and the engine lookup live once, in :class:`EngineOptions`, the pydantic base
both adapters' ``R2RRerank`` put before their framework's class.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from r2r_core.engines import shared_engine
from r2r_core.reranker import R2RReranker
from r2r_core.scoring import BASE_ADAPTER, check_max_length

__all__ = [
    "LOAD_FIELDS",
    "EngineOptions",
    "check_engine_kwargs",
    "check_max_length",
    "check_positive",
    "check_score_threshold",
    "check_top_n",
    "engine_name",
    "engine_options",
    "event_model_name",
    "load_defaults",
    "resolve_engine",
]

#: The adapter fields that only matter when the adapter loads the engine itself.
LOAD_FIELDS = ("model", "device", "dtype", "batch_size", "max_length", "template", "instruction",
               "trust_remote_code", "engine_kwargs")


def check_top_n(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"`top_n` must be >= 1 or None, got {value}")
    return value


def check_score_threshold(value: float | None) -> float | None:
    if value is not None and (isinstance(value, bool) or not 0.0 <= value <= 1.0):
        raise ValueError(f"`score_threshold` must be in [0, 1] or None, got {value!r}")
    return value


def check_positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}")
    return value


def _from_pretrained_params() -> set[str]:
    params = inspect.signature(R2RReranker.from_pretrained).parameters
    return {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_engine_kwargs(value: dict[str, Any] | None) -> dict[str, Any]:
    """``engine_kwargs``: further keyword arguments of :meth:`R2RReranker.from_pretrained` that the adapters have
    no field for (such as ``use_prefix_cache=False``). Adapter fields and unknown names are refused."""
    value = dict(value or {})
    fields = sorted(set(value) & set(LOAD_FIELDS))
    if fields:
        raise ValueError(f"`engine_kwargs` must not repeat the adapter's own fields {fields}; set them directly")
    unknown = sorted(set(value) - _from_pretrained_params())
    if unknown:
        allowed = sorted(_from_pretrained_params() - set(LOAD_FIELDS))
        raise ValueError(f"`engine_kwargs` has {unknown}, which R2RReranker.from_pretrained does not take; "
                         f"allowed: {allowed}")
    return value


def resolve_engine(
    reranker: R2RReranker | None,
    fields_set: Iterable[str],
    *,
    model: str,
    device: str | None,
    dtype: str,
    batch_size: int,
    max_length: int | None,
    expert: str | None,
    template: str | None = None,
    instruction: str | None = None,
    trust_remote_code: bool = False,
    engine_kwargs: dict[str, Any] | None = None,
) -> R2RReranker:
    """The given ``reranker``, or the shared engine for these loading options; ``expert``, when fixed, must be
    one of its experts.

    ``fields_set`` names the options the user passed explicitly: loading options next to a given engine are
    refused, since they could not take effect.
    """
    if reranker is not None:
        clashing = sorted(set(LOAD_FIELDS) & set(fields_set))
        if clashing:
            raise ValueError(
                "pass either `reranker` (an already loaded engine) or loading options, not both; "
                f"got reranker and {', '.join(clashing)}"
            )
        if not isinstance(reranker, R2RReranker):
            raise TypeError(f"`reranker` must be an r2r_core.R2RReranker, got {type(reranker).__name__}")
        engine = reranker
    else:
        engine = shared_engine(
            model, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length, template=template,
            instruction=instruction, trust_remote_code=trust_remote_code, **check_engine_kwargs(engine_kwargs),
        )
    if expert is not None and expert != BASE_ADAPTER and expert not in engine.experts:
        raise KeyError(f"`expert` {expert!r} is not in the reranker; available: {[BASE_ADAPTER, *engine.experts]}")
    return engine


def engine_options(engine: R2RReranker) -> dict[str, Any]:
    """The adapter loading fields that describe ``engine``: what it was loaded with (the device and dtype it
    actually picked); for an engine built without ``from_pretrained``, what can be read off it."""
    opts = engine.load_options
    if opts is None:
        return {
            "model": engine.backbone.model_id, "device": str(engine.backbone.device),
            "dtype": str(engine.backbone.dtype).removeprefix("torch."), "batch_size": engine.batch_size,
            "max_length": engine.encoder.max_length, "template": engine.template.name,
            "instruction": engine.instruction, "trust_remote_code": False, "engine_kwargs": {},
        }
    out = {k: opts[k] for k in LOAD_FIELDS if k in opts}
    out["engine_kwargs"] = {k: v for k, v in opts.items()
                            if k not in LOAD_FIELDS and v != _default_of(k)}
    return out


def _default_of(name: str) -> Any:
    param = inspect.signature(R2RReranker.from_pretrained).parameters.get(name)
    return None if param is None else param.default


def engine_name(engine: R2RReranker) -> str:
    """What the engine was loaded from: ``"default"``, a bundle folder or a model id (the backbone's id for an
    engine built directly)."""
    return engine.load_options["model"] if engine.load_options else engine.backbone.model_id


def event_model_name(engine: R2RReranker, expert: str) -> str:
    """The ``model_name`` the adapters report in events: ``"<bundle>:<expert>"``, e.g. ``"default:medical"``."""
    return f"{engine_name(engine)}:{expert}"



class EngineOptions(BaseModel):
    """The loading options, the fixed ``expert`` and the shared ``reranker`` of both framework adapters, with
    their checks, and the engine they select (:attr:`engine`), resolved once after validation.

    An adapter subclasses it before its framework's base class, e.g.
    ``class R2RRerank(EngineOptions, BaseNodePostprocessor)``. With ``reranker=`` given, the loading fields
    report that engine's options instead of their defaults."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str = Field(
        default="default",
        description='"default" (the bundled reranker), a bundle directory or a causal LM id/path.',
    )
    device: str | None = Field(default=None, description="cuda / mps / cpu; None picks the best one.")
    dtype: str = Field(default="auto", description='"auto", "float32", "bfloat16" or "float16".')
    batch_size: int = Field(default=16, description="Query-document pairs per forward pass.")
    max_length: int | None = Field(
        default=None,
        description="Prompt length in tokens (at least 32); None: the bundle's trained length, else 512. Only "
        "documents are cut, with a warning.",
    )
    template: str | None = Field(
        default=None,
        description="A built-in prompt template (qwen3, chatml, bge-gemma); None keeps the bundle's.",
    )
    instruction: str | None = Field(
        default=None, description="Replaces the bundle's instruction (experts with their own keep it)."
    )
    trust_remote_code: bool = Field(default=False, description="Let transformers run the model repo's code.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Further R2RReranker.from_pretrained keyword arguments, e.g. {'use_prefix_cache': False}.",
    )
    expert: str | None = Field(
        default=None, description='Always use this expert ("__base__" = no adapter); None routes per query.'
    )
    reranker: R2RReranker | None = Field(
        default=None, exclude=True, description="An already loaded R2RReranker to share."
    )

    _engine: R2RReranker = PrivateAttr()

    @field_validator("batch_size")
    @classmethod
    def _check_positive(cls, value: int, info: Any) -> int:
        return check_positive(info.field_name, value)

    @field_validator("max_length")
    @classmethod
    def _check_max_length(cls, value: int | None) -> int | None:
        return None if value is None else check_max_length(value)  # the core's rule and message

    @field_validator("engine_kwargs")
    @classmethod
    def _check_engine_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_engine_kwargs(value)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        self._engine = resolve_engine(
            self.reranker, self.model_fields_set, model=self.model, device=self.device, dtype=self.dtype,
            batch_size=self.batch_size, max_length=self.max_length, template=self.template,
            instruction=self.instruction, trust_remote_code=self.trust_remote_code,
            engine_kwargs=self.engine_kwargs, expert=self.expert,
        )
        if self.reranker is not None:  # report what the given engine was loaded with, not the field defaults
            for name, value in engine_options(self._engine).items():
                setattr(self, name, value)

    @property
    def engine(self) -> R2RReranker:
        """The loaded :class:`r2r_core.R2RReranker` (pass it as ``reranker=`` to share it)."""
        return self._engine


def load_defaults() -> dict[str, Any]:
    """The default of every loading field (:data:`LOAD_FIELDS`), from :class:`EngineOptions`: the one table an
    adapter that is no pydantic model (``R2RCrossEncoder``) compares its arguments with."""
    return {n: EngineOptions.model_fields[n].get_default(call_default_factory=True) for n in LOAD_FIELDS}

