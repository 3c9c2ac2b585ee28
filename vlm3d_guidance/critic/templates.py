"""Query templates for the VLM critic (VLM3D, section 4.2) and their resolution into weighted queries.

A template is a plain string; ``{description}`` marks where the text description goes. It is filled
by plain substitution (not ``str.format``), so descriptions and templates may contain other braces.

- ``"dual"`` (default): the paper's dual query, exactly as printed in section 4.2 (content match AND
  geometric quality), its four parts joined by newlines.
- ``"content"``: the content-match criterion alone (the paper's ablation without the geometric query).
- ``"geometry"``: the geometric-quality criterion alone (needs no description).

A ``query`` argument (see :func:`resolve_query`) is a template name, a custom template string that
contains ``{description}``, or a dict ``{name-or-template: weight}``: a weighted sum of queries whose
rewards add up to one reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

PLACEHOLDER = "{description}"

_INTRO = (
    "Carefully evaluate the provided images, which show multiple views of a single 3D object. "
    "Does the underlying 3D object, considering all views together, meet all of the following "
    "criteria simultaneously?"
)
_CONTENT = "1. Content Match: The object corresponds to the description: {description}."
_GEOMETRY = (
    "2. Geometric Quality: Based on all views combined, the object appears geometrically sound and "
    "consistent. There are no visible signs of major flaws such as multiple faces on one part "
    "(Janus-faced issue), broken surfaces, intersecting geometry, or highly unrealistic polygonal "
    "facets when considering the object from these different perspectives."
)
_ANSWER = "Strictly respond with only 'Yes' or 'No'."

#: The paper's dual query (section 4.2), verbatim, parts joined by newlines.
DUAL_TEMPLATE = "\n".join([_INTRO, _CONTENT, _GEOMETRY, _ANSWER])

_SINGLE_INTRO = (
    "Carefully evaluate the provided images, which show multiple views of a single 3D object. "
    "Does the underlying 3D object, considering all views together, meet the following criterion?"
)
#: Content match only (the paper's ablation without the geometric query).
CONTENT_TEMPLATE = "\n".join([
    _SINGLE_INTRO,
    "Content Match: The object corresponds to the description: {description}.",
    _ANSWER,
])
#: Geometric quality only (no description needed).
GEOMETRY_TEMPLATE = "\n".join([_SINGLE_INTRO, _GEOMETRY[len("2. "):], _ANSWER])

TEMPLATES = {"dual": DUAL_TEMPLATE, "content": CONTENT_TEMPLATE, "geometry": GEOMETRY_TEMPLATE}

#: The question :meth:`VLMCritic.describe` asks about a reference image.
DESCRIBE_PROMPT = "Describe the main object in this image in one short sentence. Answer with the description only."

QuerySpec = Union[str, Mapping[str, float]]


@dataclass(frozen=True)
class Query:
    """One resolved query: ``name`` (template name or ``"custom"``/``"custom<k>"``), its template
    text and its weight in the summed reward."""

    name: str
    template: str
    weight: float

    @property
    def needs_description(self) -> bool:
        return PLACEHOLDER in self.template

    def fill(self, description: str) -> str:
        """The query text with ``description`` inserted (validated by :func:`check_description`)."""
        if not self.needs_description:
            return self.template
        return self.template.replace(PLACEHOLDER, check_description(description))


def check_description(description) -> str:
    """Return ``description`` stripped; ``ValueError`` if it is not a non-empty string."""
    if not isinstance(description, str):
        raise ValueError(f"the prompt (text description) must be a str, got {type(description).__name__}")
    text = description.strip()
    if not text:
        raise ValueError("the prompt (text description) is empty; give the object's description, e.g. 'a red chair'")
    return text


def _one(key: str, custom_index: int | None) -> tuple[str, str]:
    if not isinstance(key, str):
        raise ValueError(f"a query must be a template name or a template string, got {type(key).__name__}")
    if key in TEMPLATES:
        return key, TEMPLATES[key]
    if PLACEHOLDER in key:
        return ("custom" if custom_index is None else f"custom{custom_index}"), key
    raise ValueError(
        f"unknown query {key!r}: use one of the templates {sorted(TEMPLATES)}, a custom template string "
        f"containing {PLACEHOLDER!r}, or a dict {{template-or-name: weight}}"
    )


def resolve_query(query: QuerySpec) -> tuple[Query, ...]:
    """Turn a ``query`` argument into a tuple of :class:`Query` (name, template, weight).

    ``"dual"`` -> ``(Query("dual", DUAL_TEMPLATE, 1.0),)``; a custom string -> one ``"custom"`` query;
    a dict ``{"content": 0.5, "geometry": 0.5}`` -> two weighted queries (custom strings among the
    keys are named ``custom0``, ``custom1``, ...). Raises ``ValueError`` for unknown names, empty
    dicts, non-finite weights or duplicate names.
    """
    if isinstance(query, Mapping):
        if not query:
            raise ValueError("the query dict is empty; give at least one {template-or-name: weight}")
        out, k = [], 0
        for key, weight in query.items():
            is_custom = isinstance(key, str) and key not in TEMPLATES
            name, template = _one(key, k if is_custom else None)
            k += int(is_custom)
            try:
                w = float(weight)
            except (TypeError, ValueError):
                raise ValueError(f"the weight of query {name!r} must be a number, got {weight!r}") from None
            if w != w or w in (float("inf"), float("-inf")):
                raise ValueError(f"the weight of query {name!r} must be finite, got {weight!r}")
            out.append(Query(name, template, w))
        return tuple(out)
    name, template = _one(query, None)
    return (Query(name, template, 1.0),)
