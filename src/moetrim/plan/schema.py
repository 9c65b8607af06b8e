"""The Plan as data: dataclasses, canonical JSON, and strict reading of a file a person may have edited.

A plan is meant to be read, diffed and edited by hand, so reading one checks every field's type and
the fields' agreement with each other (widths vs kept dims, sorted unique indices, counts) and says
in one line what is wrong. Agreement with a model is checked where the model is at hand (apply).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from moetrim.checkpoint.atomic import write_text
from moetrim.errors import UsageError

SCHEMA_VERSION = 1
GRANULARITIES = ("dims", "experts")
PLAN_GRANULARITIES = (*GRANULARITIES, "auto")  # what a slicing plan file may say: auto mixes dims and experts per layer
REPLACE_METHODS = ("replace", "naive", "merge", "d2", "novice", "ream")  # the granularities of moetrim.plan.replace
ALLOCATIONS = ("global", "layer", "uniform", "layer_width")


@dataclass
class LayerPlan:
    layer: int
    experts_before: int
    width_before: int
    top_k: int
    kept_experts: list[int]
    widths: list[int]  # per kept expert
    kept_dims: list[list[int]] | None = None  # per kept expert, ascending; None: all dims kept


class PlanFile:
    """What every plan (dims/experts here, replace/merge in plan.replace) shares: its removed fraction and
    one canonical JSON text, a layer a line, so the same plan is the same bytes."""

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["removed_fraction"] = round(self.removed_fraction, 6)
        return d

    def to_json(self) -> str:
        # Fixed key order and compact dim lists: the same plan is the same bytes.
        d = self.to_dict()
        lists = {k: d.pop(k) for k in ("layers", "replaced_layers") if k in d}  # a layer a line

        def rows(items: list) -> str:
            return ",\n".join("  " + json.dumps(l, sort_keys=True, separators=(",", ":")) for l in items)

        head = json.dumps(d, indent=1, sort_keys=True)
        return head[:-2] + "".join(f',\n "{k}": [\n' + rows(v) + "\n ]" for k, v in lists.items()) + "\n}\n"

    def save(self, path: str | os.PathLike) -> Path:
        return write_text(path, self.to_json())


@dataclass
class Plan(PlanFile):
    granularity: str
    criterion: str
    ratio: float
    allocation: str
    seed: int
    min_width: int | None
    round_to: int
    protect: int
    exponents: list[float] | None
    model_fingerprint: str
    profile_digest: str | None
    params_before: int
    params_after: int
    layers: list[LayerPlan]
    schema_version: int = SCHEMA_VERSION
    notes: list[str] = field(default_factory=list)
    ratio_tolerance: float | None = None  # the removed fraction is within ratio ± this (None: plans before it was stated)
    # --method auto only: layers whose experts become novices, merged or replaced groups (moetrim.plan.replace's
    # ReplaceLayer); their row in `layers` keeps every expert whole. None (and absent from the file) otherwise.
    replaced_layers: list | None = None

    def to_dict(self) -> dict:
        d = super().to_dict()
        if d.get("replaced_layers") is None:
            d.pop("replaced_layers", None)  # plans without replaced layers keep the bytes they always had
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Build a plan from its JSON dict, refusing anything `make_plan` would not have written."""
        from moetrim.plan.replace import ReplaceLayer

        _check_plan_dict(d)
        d = dict(d)
        d.pop("removed_fraction", None)
        d["layers"] = [LayerPlan(**l) for l in d["layers"]]
        if d.get("replaced_layers") is not None:
            d["replaced_layers"] = [ReplaceLayer(**r) for r in d["replaced_layers"]]
        return cls(**d)


def load_plan(path: str | os.PathLike) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"plan not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not a moetrim plan: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    try:
        return Plan.from_dict(data)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None


# -- strict reading -------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(x, what: str, *, low: int = 0) -> list[int]:
    if not isinstance(x, list) or not all(_is_int(v) and v >= low for v in x):
        raise UsageError(f"{what} must be a list of integers >= {low}")
    return x


def _sorted_unique(x: list[int], what: str) -> None:
    if any(b <= a for a, b in zip(x, x[1:])):
        raise UsageError(f"{what} must be in ascending order without repeats")


def check_plan(plan: Plan) -> None:
    """The checks a plan file gets, for a Plan object built or changed in Python."""
    _check_plan_dict(plan.to_dict())


def _check_plan_dict(d) -> None:
    if not isinstance(d, dict):
        raise UsageError(f"a plan is a JSON object, not a {type(d).__name__}; re-run `moetrim plan`")
    if d.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(f"plan schema version {d.get('schema_version')} is not {SCHEMA_VERSION}; re-run `moetrim plan`")
    if "granularity" in d and d["granularity"] not in PLAN_GRANULARITIES:
        raise UsageError(f"the plan's granularity {d['granularity']!r} is not one moetrim knows "
                         f"({', '.join([*GRANULARITIES, *REPLACE_METHODS])}); re-run `moetrim plan`")
    known = {f.name for f in fields(Plan)} | {"removed_fraction"}
    required = {f.name for f in fields(Plan) if f.name not in ("schema_version", "notes", "ratio_tolerance", "replaced_layers")}
    if missing := sorted(required - set(d)):
        raise UsageError(f"the plan lacks {', '.join(missing)}")
    if unknown := sorted(set(d) - known):
        raise UsageError(f"the plan has unknown fields {', '.join(unknown)}")
    if d["granularity"] not in PLAN_GRANULARITIES or d["allocation"] not in ALLOCATIONS or not isinstance(d["criterion"], str):
        raise UsageError("the plan's granularity, allocation or criterion is not one moetrim knows")
    for key in ("seed", "round_to", "protect", "params_before", "params_after"):
        if not _is_int(d[key]) or d[key] < 0:
            raise UsageError(f"the plan's {key} must be an integer >= 0")
    if not isinstance(d["ratio"], (int, float)) or isinstance(d["ratio"], bool) or not 0 <= d["ratio"] < 1:
        raise UsageError("the plan's ratio must be a number in [0, 1)")
    tol = d.get("ratio_tolerance")
    if tol is not None and (not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0):
        raise UsageError("the plan's ratio_tolerance must be a number >= 0")
    if d["params_after"] > d["params_before"]:
        raise UsageError("the plan's params_after exceeds params_before")
    layers = d["layers"]
    if not isinstance(layers, list) or not layers or not all(isinstance(l, dict) for l in layers):
        raise UsageError("the plan's layers must be a non-empty list of objects")
    names = {f.name for f in fields(LayerPlan)}
    seen = set()
    for l in layers:
        if set(l) != names and set(l) != names - {"kept_dims"}:
            raise UsageError(f"a plan layer has fields {sorted(l)}, expected {sorted(names)}")
        _check_layer_dict(l)
        if l["layer"] in seen:
            raise UsageError(f"the plan lists layer {l['layer']} twice")
        seen.add(l["layer"])
    if d.get("replaced_layers") is not None:
        _check_replaced_layers(d, {l["layer"]: l for l in layers})


def keeps_every_expert_whole(kept_experts: list[int], experts_before: int, widths: list[int], width_before: int) -> bool:
    """Whether a plan row keeps every expert at its full width (an auto plan's row for a replaced layer)."""
    return kept_experts == list(range(experts_before)) and all(w == width_before for w in widths)


def _check_replaced_layers(d: dict, layers: dict[int, dict]) -> None:
    """An auto plan's replaced layers: each a ReplaceLayer of a layer the plan keeps whole, with a valid layout."""
    from moetrim.model.replaced import check_layout
    from moetrim.plan.replace import ReplaceLayer

    rows = d["replaced_layers"]
    if d["granularity"] != "auto":
        raise UsageError("only an auto plan (granularity auto) has replaced_layers")
    names = {f.name for f in fields(ReplaceLayer)}
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UsageError("the plan's replaced_layers must be a list of objects")
    seen = set()
    for r in rows:
        if set(r) != names:
            raise UsageError(f"a replaced layer has fields {sorted(r)}, expected {sorted(names)}")
        index = r["layer"]
        if not _is_int(index) or index not in layers:
            raise UsageError(f"replaced layer {index!r} is not a layer of the plan")
        if index in seen:
            raise UsageError(f"the plan replaces layer {index} twice")
        seen.add(index)
        row = layers[index]
        whole = keeps_every_expert_whole(row["kept_experts"], row["experts_before"], row["widths"], row["width_before"])
        if not whole or row.get("kept_dims") is not None:
            raise UsageError(f"plan layer {index} is both sliced and replaced; a replaced layer's row keeps every expert whole")
        if (r["experts_before"], r["width"], r["top_k"]) != (row["experts_before"], row["width_before"], row["top_k"]):
            raise UsageError(f"replaced layer {index}: experts_before, width and top_k must be the layer row's")
        if r["init"] not in ("svd", "zero") or not isinstance(r["whiten"], bool) or not isinstance(r["base_weights"], dict):
            raise UsageError(f"replaced layer {index}: init must be svd or zero, whiten true or false, base_weights an object")
        try:
            check_layout(r["experts_before"], r["width"], r["width"], r["kept"], r["groups"], r["rank"], r["novices"])
        except UsageError as exc:
            raise UsageError(f"replaced layer {index}: {exc}") from None


def _check_layer_dict(l: dict) -> None:
    for key in ("layer", "experts_before", "width_before", "top_k"):
        if not _is_int(l[key]) or l[key] < (0 if key == "layer" else 1):
            raise UsageError(f"plan layer {l.get('layer')}: {key} must be a positive integer")
    where = f"plan layer {l['layer']}"
    kept = _ints(l["kept_experts"], f"{where}: kept_experts")
    widths = _ints(l["widths"], f"{where}: widths", low=1)
    if not kept:
        raise UsageError(f"{where}: kept_experts is empty; a layer keeps at least one expert")
    _sorted_unique(kept, f"{where}: kept_experts")
    if kept[-1] >= l["experts_before"]:
        raise UsageError(f"{where}: kept_experts names expert {kept[-1]} but the layer has {l['experts_before']}")
    if len(widths) != len(kept):
        raise UsageError(f"{where}: {len(widths)} widths for {len(kept)} kept experts")
    if max(widths) > l["width_before"]:
        raise UsageError(f"{where}: width {max(widths)} is more than the expert width {l['width_before']}")
    if not 1 <= l["top_k"] <= len(kept):
        raise UsageError(f"{where}: top_k {l['top_k']} must be between 1 and the {len(kept)} experts kept")
    dims = l.get("kept_dims")
    if dims is None:
        if any(w != l["width_before"] for w in widths):
            raise UsageError(f"{where}: widths below {l['width_before']} need kept_dims saying which dims stay")
        return
    if not isinstance(dims, list) or len(dims) != len(kept):
        raise UsageError(f"{where}: kept_dims must hold one list per kept expert")
    for e, w, ds in zip(kept, widths, dims):
        _ints(ds, f"{where} expert {e}: kept_dims")
        _sorted_unique(ds, f"{where} expert {e}: kept_dims")
        if len(ds) != w:
            raise UsageError(f"{where} expert {e}: width {w} but {len(ds)} kept_dims; they must agree")
        if ds and ds[-1] >= l["width_before"]:
            raise UsageError(f"{where} expert {e}: kept_dims names dim {ds[-1]} but the width is {l['width_before']}")
