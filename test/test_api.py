"""The public API a newcomer reads first: each subpackage's entry points, and the places that list the
re-rankers (configuration files, the node's parameter description, docs) kept in step with the registry."""
import importlib
import re
from pathlib import Path

import pytest
import yaml

from vpr_rerank_ros.rerank import COMPARED, available_rerankers, build_reranker, reranker_defaults

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", ["vpr_rerank_ros.rerank", "vpr_rerank_ros.descriptors",
                                     "vpr_rerank_ros.datasets"])
def test_each_subpackage_says_what_a_user_imports(package):
    module = importlib.import_module(package)
    assert module.__doc__ and len(module.__all__) >= 5
    assert all(hasattr(module, name) for name in module.__all__)


def test_eval_config_is_the_comparison_set():
    entries = yaml.safe_load((REPO / "config" / "eval_rerankers.yaml").read_text())
    def settings(name: str, params: dict) -> tuple[str, dict]:
        return name, {**reranker_defaults(name), **params}

    assert [settings(e.pop("name"), e) for e in map(dict, entries)] == [settings(n, p) for n, p in COMPARED]
    assert [name for name, _ in COMPARED] == list(available_rerankers(learned=False))
    for name, params in COMPARED:
        build_reranker(name, **params)
        assert set(params) <= set(reranker_defaults(name))


def test_every_list_of_rerankers_names_each_registered_one():
    names = set(available_rerankers())
    localize = (REPO / "config" / "localize.yaml").read_text()
    documented = [line for line in localize.splitlines() if line.lstrip().startswith("# Re-ranker")]
    assert documented and names <= set(re.findall(r"\w+", documented[0]))
    table = (REPO / "config" / "eval_rerankers.yaml").read_text()
    assert names <= set(re.findall(r"^#   (\w+)", table, re.M))
    docs = (REPO / "docs" / "reranking.md").read_text()
    assert all(f"`{name}`" in docs for name in names)


def test_the_node_describes_the_registered_rerankers():
    pytest.importorskip("rclpy")
    from vpr_rerank_ros.node import PARAMETERS

    description = PARAMETERS["reranker"][1]
    assert set(available_rerankers()) <= set(re.findall(r"\w+", description))
