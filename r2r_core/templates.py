"""Prompt templates for pointwise yes/no scoring, as data.

A prompt is ``prefix + doc_sep + document + suffix``. ``prefix`` holds everything before the document
(system message, instruction, query) and ``suffix`` everything after it (the scoring suffix), so the
engine can encode the prefix once per query and truncate only the document.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

__all__ = ["PromptTemplate", "get_template", "template_from_chat", "BUILTIN_TEMPLATES"]

_JUDGE_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    prefix: str
    suffix: str
    doc_sep: str = " "
    yes_token: str = "yes"
    no_token: str = "no"
    default_instruction: str = DEFAULT_INSTRUCTION
    add_bos: bool = False

    def __post_init__(self) -> None:
        for field in ("name", "prefix", "yes_token", "no_token"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"PromptTemplate.{field} must be a non-empty string, got {value!r}")
        for field in ("suffix", "doc_sep", "default_instruction"):
            value = getattr(self, field)
            if not isinstance(value, str):
                raise ValueError(f"PromptTemplate.{field} must be a string, got {value!r}")
        if not isinstance(self.add_bos, bool):
            raise ValueError(f"PromptTemplate.add_bos must be true or false, got {self.add_bos!r}")
        if "{query}" not in self.prefix:
            raise ValueError(f"PromptTemplate.prefix must contain '{{query}}', got {self.prefix!r}")
        if self.yes_token == self.no_token:
            raise ValueError(f"PromptTemplate.yes_token and no_token must differ, both are {self.yes_token!r}")
        for field in ("prefix", "suffix"):
            try:
                getattr(self, field).format(instruction="", query="")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"PromptTemplate.{field} may only use the fields {{instruction}} and {{query}} "
                    f"(write literal braces as '{{{{' and '}}}}'): {exc}"
                ) from exc

    def render_prefix(self, instruction: str, query: str) -> str:
        return self.prefix.format(instruction=instruction, query=query)

    def render_suffix(self, instruction: str) -> str:
        return self.suffix.format(instruction=instruction, query="")

    def render(self, instruction: str, query: str, document: str) -> str:
        """The whole prompt as one string (what a straightforward implementation would tokenize)."""
        return self.render_prefix(instruction, query) + self.doc_sep + document + self.render_suffix(instruction)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PromptTemplate:
        if not isinstance(data, dict):
            raise ValueError(f"a template must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown template fields {unknown}; allowed: {sorted(known)}")
        return cls(**data)


BUILTIN_TEMPLATES: dict[str, PromptTemplate] = {
    # Qwen3-Reranker's own format (model card), including the empty think block.
    "qwen3": PromptTemplate(
        name="qwen3",
        prefix=(
            f"<|im_start|>system\n{_JUDGE_SYSTEM}<|im_end|>\n<|im_start|>user\n"
            "<Instruct>: {instruction}\n<Query>: {query}\n<Document>:"
        ),
        suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    ),
    # The same judgement in the ChatML chat format of instruct models such as SmolLM2 (no think block).
    "chatml": PromptTemplate(
        name="chatml",
        prefix=(
            f"<|im_start|>system\n{_JUDGE_SYSTEM}<|im_end|>\n<|im_start|>user\n"
            "<Instruct>: {instruction}\n<Query>: {query}\n<Document>:"
        ),
        suffix="<|im_end|>\n<|im_start|>assistant\n",
    ),
    # FlagEmbedding's format for bge-reranker-v2-gemma: "A: query / B: passage / prompt", tokens Yes/No.
    "bge-gemma": PromptTemplate(
        name="bge-gemma",
        prefix="A: {query}\nB:",
        suffix="\n{instruction}",
        yes_token="Yes",
        no_token="No",
        default_instruction=(
            "Given a query A and a passage B, determine whether the passage contains an answer to the query "
            "by providing a prediction of either 'Yes' or 'No'."
        ),
        add_bos=True,
    ),
}


def get_template(name: str) -> PromptTemplate:
    try:
        return BUILTIN_TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown template {name!r}; built-in templates: {sorted(BUILTIN_TEMPLATES)}") from None


def template_from_chat(tokenizer, name: str = "chat", instruction: str = DEFAULT_INSTRUCTION) -> PromptTemplate:
    """Build a template from a tokenizer's own chat template (any instruct model), by rendering the judge
    conversation around sentinels and splitting there. The result is plain data like the built-ins."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; use a built-in template such as 'qwen3'")
    q, d = "\x00QUERY\x00", "\x00DOC\x00"
    user = f"<Instruct>: \x00INSTR\x00\n<Query>: {q}\n<Document>: {d}"
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": _JUDGE_SYSTEM}, {"role": "user", "content": user}],
        tokenize=False,
        add_generation_prompt=True,
    )
    text = text.replace("{", "{{").replace("}", "}}")
    before, after = text.split(f": {d}")
    prefix = before.replace("\x00INSTR\x00", "{instruction}").replace(q, "{query}") + ":"
    return PromptTemplate(name=name, prefix=prefix, suffix=after, default_instruction=instruction)
