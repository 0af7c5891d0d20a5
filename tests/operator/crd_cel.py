"""A CRD's ``x-kubernetes-validations``, evaluated as kube-apiserver evaluates them.

kube-apiserver runs cel-go; cel-expr-python wraps Google's C++ CEL runtime: the same language
and standard library (tests/chart/test_admission_policy.py relies on it too), and meshaccel's
rules use nothing Kubernetes adds to CEL. As on the API server:

* each rule runs where the schema declares it, with ``self`` the value there (on every item
  of a list and every value of a map), after defaulting, and only where that value is present;
* a null in a nullable field of an object with properties is absent to ``has()``
  (k8s.io/apiserver/pkg/cel/common/values.go, ``unstructuredMap.Find``);
* at the schema's root, ``self.metadata`` holds only ``name`` and ``generateName``;
* a rule that cannot be evaluated (an error) refuses the write, as a rule that is false does.

Not reproduced: the API server's type check of each rule against the schema and its cost
estimate when the CRD is written (tests/operator/test_crd_rules.py checks their ingredients:
fields that exist, bounded lists and strings), ``oldSelf`` and ``messageExpression`` (no
meshaccel rule uses them), ratcheting of unchanged fields.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

RULES = "x-kubernetes-validations"
Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Violation:
    """A rule that refuses a value: where (path parts), the rule and its message."""

    path: Path
    rule: str
    message: str


@functools.cache
def _environment() -> Any:
    from cel_expr_python import cel  # type: ignore[import-untyped]  # ships no py.typed

    return cel, cel.NewEnv(variables={"self": cel.Type.DYN})


@functools.cache
def _program(rule: str) -> Any:
    _, environment = _environment()
    return environment.compile(rule)


def evaluate(rule: str, value: Any) -> tuple[bool, str | None]:
    """Whether ``rule`` holds for ``self`` = ``value`` (already as CEL sees it), and the
    evaluation error if there was one (an error counts as not holding)."""
    cel, _ = _environment()
    result = _program(rule).eval(data={"self": value})
    if result.type() == cel.Type.ERROR:
        return False, str(result.plain_value())
    return result.plain_value() is True, None


def cel_value(value: Any, schema: Mapping[str, Any]) -> Any:
    """``value`` as the API server hands it to CEL: nulls of objects' fields dropped."""
    if isinstance(value, Mapping):
        properties = schema.get("properties")
        if properties is not None:
            return {
                key: cel_value(item, properties[key])
                for key, item in value.items()
                if item is not None and key in properties
            }
        extra = schema.get("additionalProperties")
        sub = extra if isinstance(extra, Mapping) else {}
        return {key: cel_value(item, sub) for key, item in value.items()}
    if isinstance(value, list):
        items = schema.get("items")
        return [cel_value(item, items if isinstance(items, Mapping) else {}) for item in value]
    return value


def violations(obj: Mapping[str, Any], root: Mapping[str, Any]) -> list[Violation]:
    """Every rule of the CRD schema ``root`` that refuses the (defaulted) object ``obj``."""
    return list(_walk(obj, root, (), at_root=True))


def _walk(
    value: Any, schema: Mapping[str, Any], path: Path, *, at_root: bool
) -> Iterator[Violation]:
    if value is None:
        return
    rules = schema.get(RULES) or ()
    if rules:
        seen = cel_value(value, schema)
        if at_root and isinstance(value, Mapping):
            metadata = value.get("metadata") or {}
            seen["metadata"] = {
                key: metadata[key] for key in ("name", "generateName") if key in metadata
            }
        for rule in rules:
            holds, error = evaluate(rule["rule"], seen)
            if not holds:
                message = rule["message"] + (f" (evaluation error: {error})" if error else "")
                yield Violation(path, rule["rule"], message)
    if isinstance(value, Mapping):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                yield from _walk(item, properties[key], (*path, key), at_root=False)
            elif properties is None and isinstance(extra, Mapping):
                yield from _walk(item, extra, (*path, key), at_root=False)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            yield from _walk(item, schema["items"], (*path, index), at_root=False)
