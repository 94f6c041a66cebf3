"""Retrieval evaluation of a map against MSLS-layout queries (real or synthetic): describe the queries
with the map's model, search (optionally near a noisy GPS hint), score against positives taken from the
map's own positions; re-rank the candidates; compare re-rankers in one table (thesis Table 4.1 layout), each
optionally followed by its geometrically verified ranking, with Recall@1 per condition of a synthetic town's
queries, and write it with one MSLS prediction file per re-ranker."""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .datasets.msls import MslsSide, write_predictions
from .descriptors.extract import DescriptorExtractor
from .descriptors.model import GlobalDescriptor
from .geo import compass_to_grid, latlon_to_utm
from .geometric import Features, GeometricSettings, GeometricVerifier
from .images import read_rgb
from .mapdb import MapBundle, SearchResult, dot_rows
from .metrics import POSITIVE_RADIUS_M, RESULT_COLUMNS, ks_up_to, positives_within, retrieval_metrics
from .rerank import Reranker, build_reranker, rerank_inputs, rerank_order, reranker_label

CONDITIONS_FILE = "synth_conditions.csv"   # a synthetic town's query conditions, beside its query images' CSV
CONDITION_FIELDS = ("time", "weather", "season")
VERIFIED_COLUMNS = ("fired", "changed")    # shares of queries where verification's trigger fired, the top 1 changed
# The thesis's parameter searches (3.4) for the query-expansion re-rankers: `vpr-eval --grid`.
THESIS_GRID = {
    "aqe": [{"k": k} for k in range(1, 6)],
    "alpha_qe": [{"k": k, "alpha": a} for k in range(1, 6) for a in (1.0, 1.5, 2.0, 2.5, 3.0)],
    "superglobal": [{"P": p, "beta": b} for p in (1, 2, 3, 4) for b in (0.15, 0.3, 0.6)],
}


@dataclass
class RetrievalRun:
    query: MslsSide            # the queries that could be described, in result order
    descriptors: np.ndarray    # their descriptors, same order
    query_poses: np.ndarray    # (Q, 3) their true easting, northing and grid heading (NaN = no compass angle)
    result: SearchResult
    positives: list            # per query: map row indices within the radius
    metrics: dict

    def first(self, k: int) -> "RetrievalRun":
        """The same run cut to each query's first `k` candidates (metrics are those of the full run)."""
        result = replace(self.result, ids=self.result.ids[:, :k], scores=self.result.scores[:, :k])
        return replace(self, result=result)


@dataclass
class Comparison:
    """One row of a re-ranker comparison: the re-ranker's name, its parameters, ranked map ids, metrics, and for a
    geometrically verified row the shares of queries where the trigger fired and where the top 1 changed."""

    name: str
    params: dict
    ranked: np.ndarray
    metrics: dict
    verified: dict = field(default_factory=dict)   # VERIFIED_COLUMNS' shares; empty: not verified

    @property
    def label(self) -> str:
        return reranker_label(self.name, self.params)


def evaluate_queries(bundle: MapBundle, model: GlobalDescriptor | None, query: MslsSide, k: int = 20,
                     radius: float = POSITIVE_RADIUS_M, hint_noise_m: float | None = None,
                     hint_radius: float | None = None, device: str | None = None, batch_size: int = 8, seed: int = 0,
                     descriptors: np.ndarray | None = None) -> RetrievalRun:
    """Recall@k / mAP@k of `bundle` for `query` images (positives within `radius` metres of map positions).

    With `hint_noise_m`, each query gets a GPS hint at its true position plus Gaussian noise of that many
    metres, and search is restricted to `hint_radius`. Pass `descriptors` (rows in `query` order) to reuse
    them; `model` is then not needed.
    """
    if descriptors is None:
        bundle.check_model(model)
        items = list(zip(query.keys, map(str, query.image_paths())))
        extraction = DescriptorExtractor(model, device, batch_size).describe_files(items)
        order = {key: i for i, key in enumerate(query.keys)}
        query = query.select(np.array([order[key] for key in extraction.keys], dtype=np.int64))
        descriptors = extraction.descriptors
    zone = bundle.table.zone                                   # the map's zone, whatever the CSV's
    east, north, _ = latlon_to_utm(query.lat, query.lon, zone)
    query_poses = np.stack([east, north, compass_to_grid(query.heading, query.lat, query.lon, zone)], axis=1)
    hint = None
    if hint_noise_m is not None:
        hint = query_poses[:, :2] + np.random.default_rng(seed).normal(0.0, hint_noise_m, (len(query), 2))
    result = bundle.search(descriptors, k, hint_xy=hint, radius=hint_radius)
    map_xy = np.stack([bundle.table.easting, bundle.table.northing], axis=1)
    positives = positives_within(query_poses[:, :2], map_xy, radius)
    return RetrievalRun(query=query, descriptors=descriptors, query_poses=query_poses, result=result,
                        positives=positives, metrics=retrieval_metrics(result.ids, positives, ks=ks_up_to(k)))


def rerank_run(bundle: MapBundle, run: RetrievalRun, reranker: Reranker, batch_size: int = 32,
               device: str = "cpu") -> tuple[np.ndarray, dict]:
    """Re-rank a retrieval run's candidates: returns (ranked map ids (Q, K), metrics). Inputs come from
    `rerank_inputs` with the queries' true grid headings; queries go through the re-ranker in batches (the
    re-ranker is checked against and attached to the map first)."""
    bundle.check_reranker(reranker)
    ids = run.result.ids
    ranked = np.empty_like(ids)
    reranker.attach_map(bundle.descriptors)
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            rows = slice(start, start + batch_size)
            inputs = rerank_inputs(bundle, run.descriptors[rows], ids[rows], run.query_poses[rows, 2],
                                   geometry=reranker.uses_geometry, device=device)
            ranked[rows] = np.take_along_axis(ids[rows], rerank_order(reranker(inputs)).cpu().numpy(), 1)
    return ranked, retrieval_metrics(ranked, run.positives, ks=ks_up_to(ids.shape[1]))


def compare_rerankers(bundle: MapBundle, run: RetrievalRun, specs: list[tuple[str, dict]], grid: bool = False,
                      device: str = "cpu", log=print, warn=print) -> list[Comparison]:
    """One row per (name, params) re-ranker, and with `grid` the best setting of each THESIS_GRID search (by
    mAP@10, reported to `log`). `warn` is told about learned re-rankers without trained weights."""
    built = [(name, params, build_reranker(name, **params)) for name, params in specs]
    for _, _, reranker in built:          # every re-ranker is refused or warned about before any runs
        bundle.check_reranker(reranker)
        untrained = reranker.untrained_warning()
        if untrained:
            warn(f"WARNING: {untrained}")
    rows = [Comparison(name, params, *rerank_run(bundle, run, reranker.to(device).eval(), device=device))
            for name, params, reranker in built]
    if grid:
        for name, settings in THESIS_GRID.items():
            scored = [Comparison(f"{name} (grid best)", params,
                                 *rerank_run(bundle, run, build_reranker(name, **params), device=device))
                      for params in settings]
            best = max(scored, key=lambda row: row.metrics["map@10"])
            log(f"grid {name}: best by mAP@10 {best.params} ({best.metrics['map@10']:.4f} of {len(settings)} "
                 "settings)")
            rows.append(best)
    return rows


def query_features(bundle: MapBundle, run: RetrievalRun) -> list[Features]:
    """Each query's local features, extracted once with the map's extractor (shared by every verified row)."""
    extractor = bundle.local_extractor()
    return [Features.of(extractor(read_rgb(path))) for path in run.query.image_paths()]


def verify_row(bundle: MapBundle, run: RetrievalRun, row: Comparison, queries: list[Features],
               settings: GeometricSettings) -> Comparison:
    """`row`'s ranking geometrically verified (its first top_n candidates, their global similarities as the prior)
    as the row `<name>+geometric`, with how often the trigger fired and the top 1 changed."""
    verifier = GeometricVerifier(settings)
    ranked, fired, changed = row.ranked.copy(), 0, 0
    for q, (ids, query) in enumerate(zip(row.ranked, queries)):
        ids = ids[ids >= 0]
        prior = dot_rows(bundle.rows(ids), run.descriptors[q].astype(np.float32))
        verification = verifier.rerank(query, bundle.matching_features(ids[:settings.top_n]), prior)
        ranked[q, :len(ids)] = ids[verification.order]
        fired += verification.fired
        changed += verification.changed_top1
    metrics = retrieval_metrics(ranked, run.positives, ks=ks_up_to(ranked.shape[1]))
    return Comparison(f"{row.name}+geometric", row.params, ranked, metrics,
                      {"fired": fired / len(queries), "changed": changed / len(queries)})


def format_table(rows: list[Comparison]) -> str:
    """The comparison as a fixed-width text table, in percent; with verified rows, the shares of queries where the
    trigger fired and the top 1 changed."""
    extra = VERIFIED_COLUMNS if any(row.verified for row in rows) else ()
    lines = [f"{'re-ranker':44s}" + "".join(f"{c:>10s}" for c in (*RESULT_COLUMNS, *extra))]
    for row in rows:
        cells = [100 * row.metrics.get(c, float("nan")) for c in RESULT_COLUMNS]
        cells += [100 * row.verified.get(c, float("nan")) for c in extra]
        lines.append(f"{row.label:44s}" + "".join(f"{v:10.2f}" for v in cells))
    return "\n".join(lines)


def read_conditions(query: MslsSide) -> dict[str, np.ndarray] | None:
    """Each query's light, weather and season (CONDITION_FIELDS) from a synthetic town's CONDITIONS_FILE, in
    `query` order; None when the city has none (real photos)."""
    path = query.directory / CONDITIONS_FILE
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        table = {row["key"]: row for row in csv.DictReader(f)}
    return {name: np.array([table[key][name] for key in query.keys]) for name in CONDITION_FIELDS}


def recall_by_condition(ranked: np.ndarray, positives: list, conditions: dict[str, np.ndarray]) -> dict:
    """{(field, value): (Recall@1, queries)} per condition: a query counts as found when its first candidate is
    among its positives (a query without positives never is)."""
    hit = np.array([bool(set(ranked[i, :1]) & set(p)) for i, p in enumerate(positives)])
    return {(name, value): (float(hit[values == value].mean()), int((values == value).sum()))
            for name, values in conditions.items() for value in np.unique(values)}


def format_conditions(rows: list[Comparison], run: RetrievalRun, conditions: dict[str, np.ndarray]) -> str:
    """Recall@1 per query condition (percent) of each row, one column per field=value (its query count below)."""
    tables = [recall_by_condition(row.ranked, run.positives, conditions) for row in rows]
    columns = list(tables[0])
    lines = [f"{'Recall@1 per condition':44s}" + "".join(f"{value:>9s}" for _, value in columns),
             f"{'(queries)':44s}" + "".join(f"{tables[0][c][1]:9d}" for c in columns)]
    for row, table in zip(rows, tables):
        lines.append(f"{row.label:44s}" + "".join(f"{100 * table[c][0]:9.1f}" for c in columns))
    return "\n".join(lines)


def write_results(out: str | Path, rows: list[Comparison], bundle: MapBundle, run: RetrievalRun) -> Path:
    """`results.csv` (fractions), `results.md` (percent) and `predictions_<label>.txt` (MSLS format, one line per
    query: the query key and its ranked map keys; the label is the re-ranker and its parameters) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = VERIFIED_COLUMNS if any(row.verified for row in rows) else ()
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["reranker", "params", *RESULT_COLUMNS, "queries", *extra])
        for row in rows:
            writer.writerow([row.name, json.dumps(row.params),
                             *(f"{row.metrics.get(c, float('nan')):.6f}" for c in RESULT_COLUMNS),
                             row.metrics["queries"],
                             *(f"{row.verified[c]:.6f}" if row.verified else "" for c in extra)])
    lines = ["| re-ranker | " + " | ".join(RESULT_COLUMNS) + " |", "|---" * (len(RESULT_COLUMNS) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row.name} {json.dumps(row.params) if row.params else ''} | " +
                     " | ".join(f"{100 * row.metrics.get(c, float('nan')):.2f}" for c in RESULT_COLUMNS) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    keys, slugs = bundle.table.keys, set()
    for row in rows:
        slug = re.sub(r"[^\w.=-]+", "_", row.label).strip("_")      # 'superglobal_P=1_beta=0.6'
        slug = f"{slug}_{len(slugs)}" if slug in slugs else slug
        slugs.add(slug)
        write_predictions(out / f"predictions_{slug}.txt", list(run.query.keys), [list(keys[r]) for r in row.ranked])
    return out
