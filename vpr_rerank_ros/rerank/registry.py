"""The single list of re-rankers by name. Built-in re-rankers are listed here explicitly (no registration
by import side effect); `register` adds another and refuses a name already taken."""
from __future__ import annotations

from . import classic, learned, neighbours
from .base import Reranker

_REGISTRY: dict[str, type[Reranker]] = {}

# The training-free re-rankers at the settings the package compares them at (vpr-eval's default rows and
# config/eval_rerankers.yaml, kept in step by a test): the thesis's best alpha-QE / SuperGlobal settings on
# MSLS val; k_reciprocal and gnn_knn at their defaults (the reference code's k-reciprocal settings, Zhang et
# al.'s alpha = 2 with 2 layers).
COMPARED = (("none", {}), ("aqe", {"k": 1}), ("alpha_qe", {"k": 1, "alpha": 1.0}),
            ("superglobal", {"P": 1, "beta": 0.6}), ("k_reciprocal", {}), ("gnn_knn", {}))


def register(cls: type[Reranker]) -> type[Reranker]:
    """Make `cls` constructible as `build_reranker(cls.name, **params)`; a second class of one name is refused."""
    if not (isinstance(cls, type) and issubclass(cls, Reranker)) or cls.name == Reranker.name:
        raise ValueError(f"{cls!r} is not a Reranker subclass with its own `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a re-ranker named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (classic.NoRerank, classic.AverageQueryExpansion, classic.AlphaQueryExpansion, classic.SuperGlobal,
             neighbours.KReciprocal, neighbours.GnnKnn, learned.GnnReranker, learned.FcReranker,
             learned.CsaReranker):
    register(_cls)


def available_rerankers(learned: bool | None = None) -> tuple[str, ...]:
    """Registered names in registration order; `learned` True / False keeps only those that do / do not need
    trained weights."""
    return tuple(name for name, cls in _REGISTRY.items() if learned is None or cls.learned == learned)


def reranker_class(name: str) -> type[Reranker]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown re-ranker {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def reranker_defaults(name: str) -> dict:
    """The parameters a re-ranker accepts, with their defaults."""
    return reranker_class(name).parameters_with_defaults()


def build_reranker(name: str, **params) -> Reranker:
    """A re-ranker by registry name with its parameters (as accepted from YAML); an unknown name or
    parameter, or a bad value, is a ValueError that names it."""
    cls = reranker_class(name)
    accepted = cls.parameters_with_defaults()
    unknown = [key for key in params if key not in accepted]
    if unknown:
        raise ValueError(f"re-ranker {name!r} has no parameter {' or '.join(map(repr, unknown))}; it takes: "
                         f"{', '.join(accepted) or 'no parameters'}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"re-ranker {name!r}: {exc}") from exc
