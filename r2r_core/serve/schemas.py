"""Request parsing for ``r2r serve``: Cohere's and Text Embeddings Inference's rerank bodies, validated by hand.

Every problem becomes a :class:`RequestError` with an HTTP status and the offending field, so bad input always
gets a 4xx JSON answer naming the field and never a 500. Unknown fields are ignored, as the upstream APIs'
clients send fields r2r has no use for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["CohereRequest", "RequestError", "TEIRequest", "parse_cohere", "parse_json", "parse_tei"]


class RequestError(Exception):
    """A request r2r cannot serve: ``status`` (4xx), the ``field`` at fault and a message saying what is allowed."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message


@dataclass(frozen=True)
class CohereRequest:
    model: str | None
    query: str
    documents: list[str]
    top_n: int | None
    return_documents: bool


@dataclass(frozen=True)
class TEIRequest:
    query: str
    texts: list[str]
    raw_scores: bool
    return_text: bool


def parse_json(body: bytes) -> dict[str, Any]:
    """The JSON object in ``body`` (400 if it is not JSON, 422 if it is not an object)."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, "body", f"the body must be a JSON object: {exc}") from None
    except RecursionError:
        raise RequestError(400, "body", "the body nests JSON too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(422, "body", f"the body must be a JSON object, got {type(data).__name__}")
    return data


def _query(data: dict) -> str:
    query = data.get("query")
    if not isinstance(query, str) or not query.strip():
        raise RequestError(422, "query", f"`query` must be a non-empty string, got {_show(query)}")
    return _encodable(query, "query")


def _encodable(text: str, field: str) -> str:
    """``text`` if it is valid Unicode (JSON can carry lone surrogates, which no tokenizer accepts)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(422, field, f"`{field}` is not valid Unicode text ({exc.reason} at {exc.start})") from None
    return text


def _flag(data: dict, name: str) -> bool:
    value = data.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(422, name, f"`{name}` must be true or false, got {_show(value)}")
    return value


def _optional_positive_int(data: dict, name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(422, name, f"`{name}` must be an integer >= 1, got {_show(value)}")
    return value


def _texts(data: dict, name: str, max_documents: int, allow_objects: bool) -> list[str]:
    items = data.get(name)
    shape = "strings or {\"text\": string} objects" if allow_objects else "strings"
    if not isinstance(items, list):
        raise RequestError(422, name, f"`{name}` must be a list of {shape}, got {_show(items)}")
    if len(items) > max_documents:
        raise RequestError(422, name, f"`{name}` may hold at most {max_documents} entries, got {len(items)}")
    out = []
    for i, item in enumerate(items):
        if allow_objects and isinstance(item, dict):
            item = item.get("text")
        if not isinstance(item, str):
            raise RequestError(422, f"{name}[{i}]", f"`{name}[{i}]` must be one of {shape}, got {_show(item)}")
        out.append(_encodable(item, f"{name}[{i}]"))
    return out


def parse_cohere(data: dict, max_documents: int) -> CohereRequest:
    """Cohere's ``/v1/rerank`` and ``/v2/rerank`` body: ``model``, ``query``, ``documents`` (strings or
    ``{"text": ...}``), ``top_n``, ``return_documents``. ``max_tokens_per_doc`` / ``max_chunks_per_doc`` are
    checked but not applied (the server's ``max_length`` is)."""
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(422, "model", f"`model` must be a string, got {_show(model)}")
    for name in ("max_tokens_per_doc", "max_chunks_per_doc"):
        _optional_positive_int(data, name)
    return CohereRequest(model=model, query=_query(data), documents=_texts(data, "documents", max_documents, True),
                         top_n=_optional_positive_int(data, "top_n"),
                         return_documents=_flag(data, "return_documents"))


def parse_tei(data: dict, max_documents: int) -> TEIRequest:
    """TEI's ``/rerank`` body: ``query``, ``texts``, ``raw_scores``, ``return_text``, ``truncate``,
    ``truncation_direction``. Over-long texts are always cut at the end to fit (TEI's ``--auto-truncate``);
    ``truncation_direction`` other than ``Right`` is refused."""
    _flag(data, "truncate")
    direction = data.get("truncation_direction")
    if direction is not None and (not isinstance(direction, str) or direction.lower() != "right"):
        raise RequestError(422, "truncation_direction",
                           f"`truncation_direction` must be \"Right\" (documents are cut at the end), got "
                           f"{_show(direction)}")
    return TEIRequest(query=_query(data), texts=_texts(data, "texts", max_documents, False),
                      raw_scores=_flag(data, "raw_scores"), return_text=_flag(data, "return_text"))


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
