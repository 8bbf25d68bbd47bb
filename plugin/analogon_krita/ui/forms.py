"""Parameter forms from the backend's JSON schemas (pydantic v2), without widgets.

``fields_from_schema`` turns a method's ``params`` schema into a list of :class:`Field`
(kind, range, default, choices, tooltip); ``coerce`` checks a value the way the backend will.
The panel builds widgets from these; tests check them without a screen.
"""
from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass, field
from typing import Any

KINDS = ("int", "float", "bool", "enum", "str", "json")
TOOLTIP_WIDTH = 60  # characters per tooltip line


def wrap_tooltip(text: str, width: int = TOOLTIP_WIDTH) -> str:
    """Plain text with its paragraphs (lines) wrapped to ``width`` characters, so that a
    tooltip is a readable block instead of one screen-wide line."""
    return "\n".join(textwrap.fill(line, width, break_long_words=False, break_on_hyphens=False)
                     if line.strip() else "" for line in (text or "").splitlines())


@dataclass
class Field:
    name: str
    kind: str
    title: str
    default: Any = None
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_min: bool = False
    exclusive_max: bool = False
    choices: list[Any] = field(default_factory=list)
    nullable: bool = False
    multiline: bool = False
    advanced: bool = False  # the schema's "advanced": shown under Advanced
    unit: str = ""  # the schema's "unit", shown after the title
    only_for: list[str] = field(default_factory=list)  # the schema's "variants": the model variants it applies to

    @property
    def label(self) -> str:
        """The title as the form shows it, with the unit."""
        return f"{self.title} ({self.unit})" if self.unit else self.title

    @property
    def tooltip(self) -> str:
        parts = [self.description] if self.description else []
        rng = self.range_text()
        if rng:
            parts.append(rng + (f" {self.unit}" if self.unit else ""))
        if self.default is not None:
            parts.append(f"Default: {self.default}")
        return wrap_tooltip("\n".join(parts))

    def range_text(self) -> str:
        if self.kind not in ("int", "float"):
            return ""
        lo = "" if self.minimum is None else f"{self.minimum:g}"
        hi = "" if self.maximum is None else f"{self.maximum:g}"
        if not lo and not hi:
            return ""
        lo, hi = lo or "\u2212\u221e", hi or "\u221e"
        return f"Range: {lo} \u2026 {hi}"

    def spin_range(self) -> tuple[float, float]:
        """(low, high) for a spin box: schema bounds, exclusive bounds nudged inward."""
        step = 1 if self.kind == "int" else 1e-3
        lo = self.minimum if self.minimum is not None else (-1e9 if self.kind == "float" else -2**31 + 1)
        hi = self.maximum if self.maximum is not None else (1e9 if self.kind == "float" else 2**31 - 1)
        if self.exclusive_min and self.minimum is not None:
            lo = lo + step
        if self.exclusive_max and self.maximum is not None:
            hi = hi - step
        if self.kind == "int":
            return int(math.ceil(lo)), int(math.floor(hi))
        return float(lo), float(hi)

    def decimals(self) -> int:
        if self.kind != "float":
            return 0
        span = [abs(v) for v in (self.minimum, self.maximum, self.default) if isinstance(v, (int, float))]
        small = [v for v in span if 0 < v < 1]
        if small:
            return max(2, min(6, int(math.ceil(-math.log10(min(small)))) + 2))
        return 2


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = schema
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        merged = dict(target)
        merged.update({k: v for k, v in node.items() if k != "$ref"})
        return merged
    if "allOf" in node and len(node["allOf"]) == 1:
        merged = _resolve(schema, node["allOf"][0])
        merged.update({k: v for k, v in node.items() if k != "allOf"})
        return merged
    return node


def _field(schema: dict, name: str, prop: dict) -> Field:
    prop = _resolve(schema, prop)
    listed = prop.get("variants")
    only_for = [v for v in listed if isinstance(v, str)] if isinstance(listed, list) else []
    nullable = False
    variants = prop.get("anyOf") or prop.get("oneOf")
    if variants:
        real = [_resolve(schema, v) for v in variants if v.get("type") != "null"]
        nullable = len(real) < len(variants)
        if len(real) == 1:
            base = dict(real[0])
            base.update({k: v for k, v in prop.items() if k not in ("anyOf", "oneOf")})
            prop = base
        else:
            prop = dict(prop, type="json")
    ptype = prop.get("type")
    if isinstance(ptype, list):
        nullable = nullable or "null" in ptype
        ptype = next((t for t in ptype if t != "null"), "string")
    title = prop.get("title") or name.replace("_", " ").capitalize()
    f = Field(name, "str", title, prop.get("default"), prop.get("description", "") or "",
              nullable=nullable, advanced=bool(prop.get("advanced")), unit=str(prop.get("unit") or ""),
              only_for=only_for)
    if "enum" in prop or "const" in prop:
        f.kind = "enum"
        f.choices = list(prop.get("enum") or [prop.get("const")])
    elif ptype == "boolean":
        f.kind = "bool"
    elif ptype in ("integer", "number"):
        f.kind = "int" if ptype == "integer" else "float"
        if "minimum" in prop:
            f.minimum = prop["minimum"]
        elif "exclusiveMinimum" in prop:
            f.minimum, f.exclusive_min = prop["exclusiveMinimum"], True
        if "maximum" in prop:
            f.maximum = prop["maximum"]
        elif "exclusiveMaximum" in prop:
            f.maximum, f.exclusive_max = prop["exclusiveMaximum"], True
    elif ptype == "string":
        f.kind = "str"
        f.multiline = prop.get("maxLength", 0) > 200 or "prompt" in name
    else:
        f.kind = "json"
    return f


def fields_from_schema(schema: dict | None) -> list[Field]:
    """The form's fields, in the schema's order."""
    if not schema:
        return []
    props = schema.get("properties") or {}
    return [_field(schema, name, prop) for name, prop in props.items()]


class FormError(ValueError):
    pass


def for_model(fields: list[Field], variant: str | None) -> list[Field]:
    """The fields the form shows for a model of ``variant``: a field the schema marks for some
    variants only (the SDXL refiner's aesthetic scores) is left out for the others; with the
    variant unknown, every field is shown."""
    if not variant:
        return list(fields)
    return [f for f in fields if not f.only_for or variant in f.only_for]


def coerce(f: Field, value: Any) -> Any:
    """Check and convert one value as the backend's schema would; FormError if invalid."""
    if value is None or (f.kind != "str" and value == ""):
        if f.nullable:
            return None
        if f.default is not None:
            return f.default
        raise FormError(f"{f.title}: a value is needed.")
    if f.kind == "bool":
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    if f.kind in ("int", "float"):
        try:
            v = int(round(float(value))) if f.kind == "int" else float(value)
        except (TypeError, ValueError):
            raise FormError(f"{f.title}: \u201c{value}\u201d is not a number.") from None
        if f.minimum is not None and (v < f.minimum or (f.exclusive_min and v == f.minimum)):
            raise FormError(f"{f.title}: {v:g} is below the allowed range ({f.range_text()}).")
        if f.maximum is not None and (v > f.maximum or (f.exclusive_max and v == f.maximum)):
            raise FormError(f"{f.title}: {v:g} is above the allowed range ({f.range_text()}).")
        return v
    if f.kind == "enum":
        if value in f.choices:
            return value
        for c in f.choices:
            if str(c) == str(value):
                return c
        raise FormError(f"{f.title}: choose one of {', '.join(str(c) for c in f.choices)}.")
    if f.kind == "json":
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise FormError(f"{f.title}: not valid JSON.") from None
        return value
    return str(value)


def defaults(fields: list[Field]) -> dict[str, Any]:
    return {f.name: f.default for f in fields}


def coerce_all(fields: list[Field], values: dict[str, Any]) -> dict[str, Any]:
    """All values, checked. Unknown keys (from older settings) are dropped."""
    out = {}
    for f in fields:
        out[f.name] = coerce(f, values.get(f.name, f.default))
    return out
