"""Prompt templates: how a dataset example becomes model input text and a target text.

A task's YAML holds a `PromptTemplate`: Jinja2 source for the *prompt* (the input part) and
the *target* (the completion/label), plus the strings that glue them together. Templates are
rendered in Jinja2's immutable sandbox with `StrictUndefined`, because task YAML is data that
anyone may hand us: a template cannot call arbitrary methods or mutate the example, and a
misspelt field is an error instead of a silently empty string. The fields a template uses are
checked against the dataset's columns at load (`check_fields`), before any model runs.

How the two parts feed a model:

- **encoder-decoder** (T5): the rendered prompt is the encoder input and the rendered target,
  *without* the delimiter, is the labels (the tokenizer appends EOS).
- **decoder-only** (GPT-2): the training text is ``prompt + target_delimiter + target + EOS``
  and the loss covers ``target_delimiter + target + EOS``; at evaluation the model sees the
  prompt and generates the rest.

The delimiter belongs to the target ("French:" + " Bonjour", GPT-3 style). GPT-2's byte-level
BPE attaches a leading space to the following word (" Bonjour" is one token), so with the space
on the target side ``tokens(prompt) + tokens(delimiter + target) == tokens(prompt + delimiter +
target)``: the prompt tokens seen at evaluation are exactly a prefix of the training sequence.
A trailing space in the prompt breaks that: "French: " ends with a lone " " token, after which
the model must produce "Bonjour" *without* its usual leading space — a sequence it almost never
saw in pretraining. `PromptTemplate` therefore rejects a prompt template ending in a space or tab.

BOS: nothing here adds a BOS token. GPT-2's tokenizer adds none (its BOS and EOS are both
``<|endoftext|>``), so the prompt is tokenized as is; a model that wants BOS must get it from its
tokenizer's own post-processing, never implicitly from us.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

_ENVIRONMENT = ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
)
# Errors a template can raise while rendering a (well-formed) example: undefined fields and
# sandbox violations are TemplateErrors; the rest come from expressions such as `{{ a + 1 }}`.
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError)


@functools.lru_cache(maxsize=256)
def _compile(source: str) -> jinja2.Template:
    """Compile once per distinct source; templates are rendered once per example."""
    return _ENVIRONMENT.from_string(source)


def _short(source: str, limit: int = 80) -> str:
    """The template source as shown in error messages (repr, cut to `limit` characters)."""
    return repr(source if len(source) <= limit else source[: limit - 3] + "...")


@dataclass
class PromptTemplate:
    """How to render one example into prompt and target text (see the module docstring).

    Fields are plain typed values so a task YAML (jsonargparse / LightningCLI) can fill them.
    `instruction` is literal text put verbatim before the demonstrations (not a template):
    include its own trailing separator, e.g. ``"Translate English to French.\\n\\n"``.
    """

    prompt: str
    target: str = "{{ target }}"
    target_delimiter: str = " "
    demo_separator: str = "\n\n"
    stop: list[str] = field(default_factory=lambda: ["\n"])
    instruction: str = ""

    def __post_init__(self) -> None:
        for name in ("prompt", "target"):
            source = getattr(self, name)
            if not isinstance(source, str):
                raise ValueError(f"{name} template must be a string, got {type(source).__name__}")
            try:
                _compile(source)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(
                    f"{name} template {_short(source)} is not valid Jinja2: {e} (line {e.lineno})"
                ) from None
        if self.prompt.endswith((" ", "\t")):
            raise ValueError(
                f"prompt template {_short(self.prompt)} ends with whitespace; put the space in "
                "target_delimiter instead (the space belongs to the target token for byte-level "
                "BPE: 'French:' + ' Bonjour', not 'French: ' + 'Bonjour')"
            )
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")

    def fields(self) -> set[str]:
        """The example fields (top-level variables) that the prompt and target templates use."""
        return self._template_fields("prompt") | self._template_fields("target")

    def _template_fields(self, name: str) -> set[str]:
        # Jinja globals (range, namespace, ...) are undeclared too, but they are not fields.
        names = meta.find_undeclared_variables(_ENVIRONMENT.parse(getattr(self, name)))
        return set(names) - set(_ENVIRONMENT.globals)

    def check_fields(self, available: Iterable[str], task_name: str) -> None:
        """Raise ValueError if a template uses a field the dataset lacks.

        Called when a task is loaded, so a typo in a template fails before any model is built
        or any example is rendered.
        """
        available = sorted(set(available))
        for name in ("prompt", "target"):
            unknown = sorted(self._template_fields(name) - set(available))
            if unknown:
                raise ValueError(
                    f"task {task_name!r}: {name} template {_short(getattr(self, name))} uses "
                    f"field {unknown[0]!r}" + (f" (and {unknown[1:]})" if unknown[1:] else "")
                    + f", which the dataset does not have; available fields: {available}"
                )

    def render_prompt(self, example: Mapping[str, Any]) -> str:
        """The input text: encoder input (T5) or the text a decoder-only model continues."""
        return self._render("prompt", example)

    def render_target(self, example: Mapping[str, Any]) -> str:
        """The label text, without the delimiter (encoder-decoder labels; a reference answer)."""
        return self._render("target", example)

    def render_completion(self, example: Mapping[str, Any]) -> str:
        """``target_delimiter + target``: what a decoder-only model learns to continue with."""
        return self.target_delimiter + self.render_target(example)

    def render_demo(self, example: Mapping[str, Any]) -> str:
        """A solved demonstration for few-shot prompts: ``prompt + target_delimiter + target``."""
        return self.render_prompt(example) + self.render_completion(example)

    def _render(self, name: str, example: Mapping[str, Any]) -> str:
        source = getattr(self, name)
        try:
            return _compile(source).render(example)
        except _RENDER_ERRORS as e:
            raise ValueError(
                f"{name} template {_short(source)} failed on an example with fields "
                f"{sorted(example)}: {type(e).__name__}: {e}"
            ) from None


def strip_completion(text: str, stop: Sequence[str]) -> str:
    """Cut generated text at the first occurrence of any stop string, then strip whitespace.

    "First" means earliest position in `text`, whichever stop string it is. A completion that
    starts with a stop string (e.g. a newline before the answer) becomes "" — the same rule as
    lm-evaluation-harness' ``until``; we do not skip leading stops, so scores stay comparable.
    """
    cut = len(text)
    for s in stop:
        if not s:
            raise ValueError("stop strings must be non-empty")
        position = text.find(s)
        if position != -1:
            cut = min(cut, position)
    return text[:cut].strip()
