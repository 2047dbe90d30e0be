"""Build River models from the spec, and the three calls every process makes on them.

``build_model(spec.model)`` imports each step by dotted path, builds nested components
(a parameter that is a mapping with a ``class`` key), checks the result is a River
estimator and chains the steps with ``|``.

A spec is data, not code: every dotted path in it (steps and nested components) must
start with an allowed prefix, ``river.`` plus the operator's ``WEIR_MODEL_ALLOW``, and
the whole tree is checked before anything is imported or called
(:func:`check_allowed`). A name that starts with ``_``, or an object re-exported from
outside the allowed packages (``river.x.copy``), is refused as well.

``predict``, ``learn`` and ``coerce_label`` are the only places that know how a task's
labels look to the model:

* binary: ``bool`` (``True`` is the positive class). ``proba`` is ``{"False": p, "True": q}``.
* multiclass: ``str``. ``proba`` is ``{class: p}``.
* regression: ``float``. ``proba`` is ``None``.

Examples:
    >>> from weir.spec import ModelSpec
    >>> spec = ModelSpec.model_validate({"steps": [
    ...     "river.preprocessing.StandardScaler",
    ...     {"class": "river.linear_model.LogisticRegression",
    ...      "params": {"optimizer": {"class": "river.optim.SGD", "params": {"lr": 0.1}}}},
    ... ]})
    >>> model = build_model(spec)
    >>> predict(model, {"a": 1.0}, "binary")
    (False, {'False': 0.5, 'True': 0.5})
    >>> learn(model, {"a": 1.0}, "1", "binary")
    >>> predict(model, {"a": 1.0}, "binary")[0]
    True
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from features.base import to_model_input
from weir.errors import InvalidMessage, ModelError
from weir.types import LabelValue

if TYPE_CHECKING:
    from weir.spec import ComponentSpec, ModelSpec, PipelineSpec, Task

_TRUE = {"1", "true", "yes", "t"}
_FALSE = {"0", "false", "no", "f"}


#: Always allowed: River's own classes. An operator adds prefixes with ``WEIR_MODEL_ALLOW``.
DEFAULT_ALLOWED: tuple[str, ...] = ("river.",)


def allowed_prefixes() -> tuple[str, ...]:
    """``river.`` plus the prefixes of ``WEIR_MODEL_ALLOW`` (the process settings)."""
    from weir.settings import get_settings

    return get_settings().model_allow_prefixes()


def _under(path: str, prefixes: Sequence[str]) -> bool:
    # "mypkg.models." allows mypkg.models.X; "mypkg.models" allows that module and below.
    for prefix in prefixes:
        if prefix.endswith("."):
            if path.startswith(prefix):
                return True
        elif path == prefix or path.startswith(prefix + "."):
            return True
    return False


def _components(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """``(where, dotted path)`` of every component in a parameter value, nested ones too."""
    if _is_component(value):
        yield f"{where}.class", str(value["class"])
        for k, v in dict(value.get("params") or {}).items():
            yield from _components(v, f"{where}.params.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _components(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _components(v, f"{where}.{k}")


def _refusal(where: str, path: str, prefixes: Sequence[str]) -> str | None:
    if any(part.startswith("_") for part in path.split(".")):
        return (
            f"{where}: {path!r} names a private attribute (a part starts with '_'); "
            "name a public class, e.g. 'river.linear_model.LogisticRegression'"
        )
    if not _under(path, prefixes):
        top = path.split(".")[0]
        return (
            f"{where}: {path!r} is not allowed: a spec may only name classes under "
            f"{', '.join(repr(p) for p in prefixes)}; use a River class, or, if {top!r} is "
            f"your own trusted package, allow it with WEIR_MODEL_ALLOW={top}. "
            "(comma separated prefixes)"
        )
    return None


def _refusals(component: ComponentSpec, where: str, prefixes: Sequence[str]) -> Iterator[str]:
    """The refusals of a component and of every component nested in its parameters."""
    tree = {"class": component.cls, "params": component.params}
    for w, path in _components(tree, where):
        problem = _refusal(w, path, prefixes)
        if problem:
            yield problem


def check_allowed(model_spec: ModelSpec, prefixes: Sequence[str] | None = None) -> None:
    """Refuse a spec naming anything outside ``prefixes``; imports and calls nothing.

    Args:
        model_spec: the spec's ``model``; every step and nested component is checked.
        prefixes: allowed dotted-path prefixes; default :func:`allowed_prefixes`.

    Raises:
        ModelError: naming every refused ``steps[i]...class``, the allowed prefixes and the fix.

    Examples:
        >>> from weir.spec import ModelSpec
        >>> check_allowed(ModelSpec.model_validate({"steps": ["subprocess.run"]}), ["river."])
        Traceback (most recent call last):
        ...
        weir.errors.ModelError: model.steps[0].class: 'subprocess.run' is not allowed: ...
    """
    prefixes = tuple(prefixes) if prefixes is not None else allowed_prefixes()
    problems = [
        problem
        for i, step in enumerate(model_spec.steps)
        for problem in _refusals(step, f"model.steps[{i}]", prefixes)
    ]
    if problems:
        raise ModelError("\n".join(problems))


def _import(path: str, where: str, prefixes: Sequence[str]) -> Any:
    # The allowlist is checked here too, so no caller can import around it.
    problem = _refusal(where, path, prefixes)
    if problem:
        raise ModelError(problem)
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = ""
        parent, _, leaf = module_name.rpartition(".")
        if parent:
            try:
                pmod = importlib.import_module(parent)
                close = difflib.get_close_matches(leaf, dir(pmod), n=1)
                if close:
                    hint = f" (did you mean '{parent}.{close[0]}.{attr}'?)"
            except ImportError:
                pass
        raise ModelError(
            f"{where}: cannot import module {module_name!r} of {path!r}: {exc}{hint}; "
            "give the full dotted path, e.g. 'river.linear_model.LogisticRegression'"
        ) from None
    try:
        target = getattr(module, attr)
    except AttributeError:
        public = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, public, n=3)
        hint = (
            f"did you mean {', '.join(repr(f'{module_name}.{c}') for c in close)}?"
            if close
            else f"{module_name} has: {', '.join(sorted(public)[:20])}"
        )
        raise ModelError(f"{where}: {module_name!r} has no {attr!r} (got {path!r}); {hint}") from None
    # An allowed module may re-export something from elsewhere (river.x imports copy, scipy...):
    # what is called must itself be defined under an allowed prefix.
    origin = getattr(target, "__module__", None) or ""
    if not _under(f"{origin}.{attr}", prefixes):
        raise ModelError(
            f"{where}: {path!r} is defined in {origin or 'an unknown module'!r}, outside the "
            f"allowed {', '.join(repr(p) for p in prefixes)}; name the class where it is defined"
        )
    # River's components are classes; its functions (river.stream.iter_csv reads files) are
    # not steps. Factories are for the operator's own packages (WEIR_MODEL_ALLOW).
    if _under(path, DEFAULT_ALLOWED) and not inspect.isclass(target):
        raise ModelError(
            f"{where}: {path!r} is a {type(target).__name__}, not a class; a spec builds River "
            "classes only, e.g. 'river.linear_model.LogisticRegression'"
        )
    return target


def _is_component(value: Any) -> bool:
    return isinstance(value, dict) and "class" in value


def _build_value(value: Any, where: str, prefixes: Sequence[str]) -> Any:
    if _is_component(value):
        extra = set(value) - {"class", "params"}
        if extra:
            raise ModelError(
                f"{where}: a component takes only 'class' and 'params', got keys {sorted(extra)}"
            )
        return _build(str(value["class"]), dict(value.get("params") or {}), where, prefixes)
    if isinstance(value, list):
        return [_build_value(v, f"{where}[{i}]", prefixes) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _build_value(v, f"{where}.{k}", prefixes) for k, v in value.items()}
    return value


def _build(path: str, params: dict[str, Any], where: str, prefixes: Sequence[str]) -> Any:
    target = _import(path, f"{where}.class", prefixes)
    kwargs = {k: _build_value(v, f"{where}.params.{k}", prefixes) for k, v in params.items()}
    if not callable(target):
        raise ModelError(f"{where}.class: {path!r} is not a class or factory; name a River class")
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        accepts_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        if not accepts_any:
            unknown = [k for k in kwargs if k not in sig.parameters]
            if unknown:
                known = [n for n in sig.parameters if n != "self"]
                close = difflib.get_close_matches(unknown[0], known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"{path} takes {known}"
                raise ModelError(f"{where}.params: unknown parameter(s) {unknown}; {hint}")
    try:
        return target(**kwargs)
    except Exception as exc:  # a River constructor rejecting a value
        raise ModelError(f"{where}: {path}(**{params!r}) failed: {exc}") from None


def build_component(
    component: ComponentSpec, where: str = "component", prefixes: Sequence[str] | None = None
) -> Any:
    """Build one component (estimator, optimizer, loss...) with its nested components.

    Every dotted path must be under ``prefixes`` (default :func:`allowed_prefixes`).
    """
    prefixes = tuple(prefixes) if prefixes is not None else allowed_prefixes()
    for problem in _refusals(component, where, prefixes):
        raise ModelError(problem)
    return _build(component.cls, dict(component.params), where, prefixes)


def build_model(model_spec: ModelSpec, prefixes: Sequence[str] | None = None) -> Any:
    """Build the River estimator described by ``model_spec`` (steps chained with ``|``).

    With ``model_spec.features`` the pipeline starts with ``compose.Select`` of them.
    Every step is checked against the allowlist (``prefixes``, default ``river.`` plus
    ``WEIR_MODEL_ALLOW``) before the first import.

    Raises:
        ModelError: naming ``steps[i].class`` (or ``.params``), the bad value and the fix.
    """
    from river import base

    prefixes = tuple(prefixes) if prefixes is not None else allowed_prefixes()
    check_allowed(model_spec, prefixes)
    model: Any = None
    for i, step in enumerate(model_spec.steps):
        where = f"model.steps[{i}]"
        built = build_component(step, where, prefixes)
        if not isinstance(built, base.Estimator):
            raise ModelError(
                f"{where}.class: {step.cls!r} builds a {type(built).__name__}, not a River "
                "estimator; steps must be River transformers or a final predictor"
            )
        model = built if model is None else model | built
    last = model_spec.steps[-1]
    final = _last_step(model)
    if isinstance(final, base.Transformer) and not isinstance(final, base.Classifier | base.Regressor):
        raise ModelError(
            f"model.steps[{len(model_spec.steps) - 1}].class: {last.cls!r} is a transformer; "
            "the last step must be a classifier or regressor"
        )
    if model_spec.features:
        from river import compose

        model = compose.Select(*model_spec.features) | model
    return model


def _last_step(model: Any) -> Any:
    from river import compose

    return list(model.steps.values())[-1] if isinstance(model, compose.Pipeline) else model


def check_task(model: Any, task: Task) -> None:
    """Raise ModelError when the model cannot do the spec's task."""
    from river import base

    final = _last_step(model)
    want = base.Regressor if task == "regression" else base.Classifier
    if not isinstance(final, want):
        raise ModelError(
            f"model: the task is {task!r} but the last step is a {type(final).__name__}; "
            f"use a {'regressor' if task == 'regression' else 'classifier'}"
        )
    if task == "multiclass" and not getattr(final, "_multiclass", True):
        raise ModelError(
            f"model: task 'multiclass' but {type(final).__name__} is binary only; wrap it in "
            "river.multiclass.OneVsRestClassifier or pick a multiclass model"
        )


#: The model's ``x``: the served features without the undefined (None) ones. One
#: definition, shared with the scorer (:func:`features.base.to_model_input`).
model_input = to_model_input


def predict(model: Any, x: dict[str, Any], task: Task) -> tuple[LabelValue | None, dict[str, float] | None]:
    """``(prediction, proba)``. A classifier that has seen no class yet gives ``(None, None)``.

    For classification the prediction is River's ``predict_one`` (the most probable
    class, first one on ties) computed from the same ``predict_proba_one`` call.
    """
    if task == "regression":
        y = model.predict_one(x)
        return (None if y is None else float(y)), None
    raw = model.predict_proba_one(x)
    if not raw:
        return None, None
    best = max(raw, key=raw.get)
    return best, {str(k): float(v) for k, v in raw.items()}


def learn(model: Any, x: dict[str, Any], y: LabelValue, task: Task) -> None:
    """Learn one example; ``y`` is coerced to the task's label type first."""
    model.learn_one(x, _coerce_for_task(y, task, None))


def coerce_label(value: Any, spec: PipelineSpec) -> LabelValue:
    """The label as the model learns it, or InvalidMessage('label_type' | 'label_class').

    With two ``classes`` declared for a binary task, ``classes[1]`` is ``True``.
    """
    return _coerce_for_task(value, spec.task, spec.classes)


def _coerce_for_task(value: Any, task: Task, classes: list[str] | None) -> LabelValue:
    if task == "binary":
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            v = value.strip()
            if classes and len(classes) == 2 and v in classes:
                return v == classes[1]
            if v.lower() in _TRUE:
                return True
            if v.lower() in _FALSE:
                return False
        raise InvalidMessage(
            "label_type",
            f"label: a binary label must be true/false, 0/1 or '0'/'1', got {value!r}",
        )
    if task == "multiclass":
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise InvalidMessage("label_type", f"label: a multiclass label must be a string, got {value!r}")
        label = str(value)
        if classes and label not in classes:
            raise InvalidMessage(
                "label_class", f"label: {label!r} is not one of the spec's classes {classes}"
            )
        return label
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidMessage("label_type", f"label: a regression target must be a number, got {value!r}")
    try:
        y = float(value)
    except ValueError:
        raise InvalidMessage(
            "label_type", f"label: a regression target must be a number, got {value!r}"
        ) from None
    if y != y or y in (float("inf"), float("-inf")):
        raise InvalidMessage("label_type", f"label: a regression target must be finite, got {y}")
    return y
