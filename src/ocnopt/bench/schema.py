"""The JSON schema of ``results.json`` and of the run files, and its validator.

A tiny structural schema: a type / tuple of types, a dict of required keys, ``("list", spec)``,
``("map", spec)`` for str-keyed dicts, or ``("null", spec)`` for "spec or null". Keys not
listed are allowed (readers ignore them). ``docs/results-schema.md`` documents the same thing.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["RESULTS_SCHEMA", "RUN_SCHEMA", "SCHEMA_VERSION", "validate_results",
           "validate_run"]

#: Version of the ``results.json`` / run-file layout; bumped when a key is removed or retyped.
SCHEMA_VERSION = 1

_NUM = (int, float)
_HISTORY = {k: ("list", ("null", _NUM)) for k in (
    "step", "epoch", "time_s", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc")}
RUN_SCHEMA: dict[str, Any] = {
    "run_id": str,
    "config": {"dataset": str, "model": str, "optimizer": str, "lr": _NUM, "seed": int,
               "epochs": int, "batch_size": int, "model_options": dict,
               "subset": ("null", int), "eval_subset": ("null", int),
               "eval_every": ("null", int),
               "norm_every": ("null", int), "device": str, "loss": str,
               "optimizer_options": dict},
    "status": str, "diverged": bool, "diverged_at_step": ("null", int),
    "nonfinite_steps": int, "chance_acc": _NUM, "last_finite": ("null", dict),
    "steps": int, "steps_per_epoch": int, "train_time_s": _NUM,
    "ms_per_step": ("null", _NUM), "peak_mem_mb": ("null", _NUM),
    "final": {"train_loss": ("null", _NUM), "val_acc": _NUM, "test_acc": _NUM,
              "val_loss": ("null", _NUM), "test_loss": ("null", _NUM)},
    "history": _HISTORY,
    "layer_norms": ("null", {"layers": ("list", str), "step": ("list", int),
                             "update_norm": ("list", ("list", ("null", _NUM))),
                             "grad_norm": ("list", ("list", ("null", _NUM)))}),
}
_OPT = {"name": str, "family": str, "best_lr": _NUM, "lr_source": str,
        "lr_grid": ("list", _NUM),
        "tuning": ("list", {"lr": _NUM, "run_id": str, "val_acc": _NUM, "diverged": bool}),
        "runs": ("list", {"run_id": str, "seed": int, "lr": _NUM, "lr_multiplier": _NUM})}
_EXP = {"name": str, "kind": str, "dataset": str, "model": str, "epochs": int,
        "batch_size": int, "subset": ("null", int), "seeds": ("list", int), "status": str,
        "skip_reason": ("null", str), "data": ("null", dict),
        "lr_multipliers": ("null", ("list", _NUM)),
        "skipped_optimizers": ("list", {"name": str, "reason": str}),
        "optimizers": ("list", _OPT)}
_SPEED_ROW = {"model": str, "optimizer": str, "ms_per_step": ("null", _NUM),
              "ratio_to_adam": ("null", _NUM), "peak_mem_mb": ("null", _NUM),
              "state_mb": ("null", _NUM)}
_ABLATION_GRID = {"base": str, "variant": str, "param": str, "values": ("list", _NUM),
                  "lrs": ("list", _NUM),
                  "cells": ("list", {"lr": _NUM, "value": _NUM, "base_runs": ("list", str),
                                     "variant_runs": ("list", str)})}
_COST = {"config": dict, "device": str,
         "rows": ("list", {"optimizer": str, "batch_size": int, "s_per_iter": ("null", _NUM),
                           "peak_mem_mb": ("null", _NUM), "status": str})}
RESULTS_SCHEMA: dict[str, Any] = {
    "schema_version": int,
    "complete": bool,
    "suite": {"name": str, "description": str, "seeds": int, "lr_tuning": bool, "speed": bool,
              "experiments": ("list", dict)},
    "meta": {"command": str, "started_at": str, "device": str, "torch_version": str,
             "runs_trained": int, "runs_reused": int, "wall_time_s": ("null", _NUM)},
    "experiments": ("list", _EXP),
    "runs": ("map", RUN_SCHEMA),
    "speed": ("null", ("list", _SPEED_ROW)),
    "speed_error": ("null", str),
}


def _check(obj: Any, spec: Any, path: str, errors: list[str]) -> None:
    if isinstance(spec, dict):
        if not isinstance(obj, dict):
            errors.append(f"{path}: expected object, got {type(obj).__name__}")
            return
        for key, sub in spec.items():
            if key not in obj:
                errors.append(f"{path}.{key}: missing")
            else:
                _check(obj[key], sub, f"{path}.{key}", errors)
    elif isinstance(spec, tuple) and spec and isinstance(spec[0], str):
        tag, sub = spec
        if tag == "null":
            if obj is not None:
                _check(obj, sub, path, errors)
        elif tag == "list":
            if not isinstance(obj, list):
                errors.append(f"{path}: expected array, got {type(obj).__name__}")
                return
            for i, item in enumerate(obj):
                _check(item, sub, f"{path}[{i}]", errors)
        elif tag == "map":
            if not isinstance(obj, dict):
                errors.append(f"{path}: expected object, got {type(obj).__name__}")
                return
            for k, item in obj.items():
                _check(item, sub, f"{path}[{k!r}]", errors)
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        ok = isinstance(obj, types) and not (isinstance(obj, bool) and bool not in types)
        if isinstance(obj, float) and not math.isfinite(obj):
            ok = False
        if not ok:
            want = "/".join(t.__name__ for t in types)
            errors.append(f"{path}: expected {want}, got {type(obj).__name__} {obj!r:.40}")


def validate_results(obj: Any) -> list[str]:
    """Check ``obj`` (parsed ``results.json``) against the documented schema.

    Returns a list of error strings (empty when valid): missing keys, wrong types, non-finite
    numbers, an unknown ``schema_version``, or run ids referenced but not present.
    """
    errors: list[str] = []
    _check(obj, RESULTS_SCHEMA, "$", errors)
    if errors:
        return errors
    if obj["schema_version"] != SCHEMA_VERSION:
        errors.append(f"$.schema_version: {obj['schema_version']} != {SCHEMA_VERSION}")
    for i, e in enumerate(obj["experiments"]):
        if e["kind"] not in ("compare", "robustness", "vanishing", "ablation"):
            errors.append(f"$.experiments[{e['name']}].kind: unknown {e['kind']!r}")
        ids = [r["run_id"] for o in e["optimizers"] for r in [*o["runs"], *o["tuning"]]]
        if e.get("ablation") is not None:
            _check(e["ablation"], ("list", _ABLATION_GRID), f"$.experiments[{i}].ablation",
                   errors)
            if errors:
                return errors
            ids += [rid for g in e["ablation"] for c in g["cells"]
                    for rid in (*c["base_runs"], *c["variant_runs"])]
        for rid in ids:
            if rid not in obj["runs"]:
                errors.append(f"$.experiments[{e['name']}]: run {rid} not in $.runs")
    if obj.get("cost") is not None:
        _check(obj["cost"], _COST, "$.cost", errors)
    for rid, r in obj["runs"].items():
        if r["run_id"] != rid:
            errors.append(f"$.runs[{rid!r}].run_id: {r['run_id']!r} differs from its key")
        h = r["history"]
        if len({len(v) for v in h.values()}) > 1:
            errors.append(f"$.runs[{rid!r}].history: series of different lengths")
        if r["status"] not in ("ok", "diverged") or (r["status"] == "diverged") != r["diverged"]:
            errors.append(f"$.runs[{rid!r}].status: inconsistent with diverged")
    return errors


def validate_run(obj: Any) -> list[str]:
    """Check one run record (a ``runs/<run_id>.json`` file) against :data:`RUN_SCHEMA`;
    returns the error strings (empty when valid)."""
    errors: list[str] = []
    _check(obj, RUN_SCHEMA, "$", errors)
    if not errors and len({len(v) for v in obj["history"].values()}) > 1:
        errors.append("$.history: series of different lengths")
    return errors
