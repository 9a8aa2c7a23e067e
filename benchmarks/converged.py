"""Merge quality on converged base models, and where the spaces are observed.

The base models are the committed checkpoints of ``benchmarks/models/``
(Fashion-MNIST, trained by ``benchmarks/base_models.py``). For every family
with at least two trained models, every pair of models and all the models
together are merged with

* ``PermutationAligner()`` (one-to-one matching of the features),
* ``CCAAligner()`` at its default regularization (0.3),
* ``CCAAligner`` with the regularization picked from a grid on held-out data
  (2,000 held-out training images, never trained or aligned on; every grid
  point is a ``ModelMerger.refit`` of the same statistics),
* ``IdentityAligner()`` (plain averaging of the parameters, the baseline),
* the CCA of the reference code as a formula (``_reference_cca.RidgeCCAAligner``:
  the absolute ridge ``S + gamma I`` instead of skmerge's scale-free
  shrinkage), ``gamma`` picked from the reference's grid ``1e-6 ... 1e7`` on the
  same held-out data, observed at ``formed`` (where the reference code
  observes the features),
* REPAIR (``repair=True``) after ``PermutationAligner()`` and after
  ``CCAAligner()``, observed at ``formed``, on the families without BatchNorm
  (where the re-estimated BatchNorm statistics are not already a
  renormalization of every channel),
* ``OptimalTransportAligner()`` and ``ProcrustesAligner()`` at the default
  placement (``--parts aligners``; the second a ``ModelMerger.refit`` of the
  first one's statistics), and on the families without BatchNorm optimal
  transport followed by REPAIR: which of skmerge's aligners keeps the most of
  the base accuracy,
* an ablation, at ``formed`` only: ``CCAAligner()`` with the
  per-channel scales (BatchNorm weights; ``ParamSlice.scale``) transformed
  as vectors (``mapping.T @ s``) instead of by the diagonal of
  ``inverse_mapping @ diag(s) @ mapping``,

each with the spaces observed at four placements
(:func:`skmerge.graph.find_spaces` ``taps=``): ``"formed"`` (where the
features are formed, before any pooling, as in the paper), ``"consumers"``
(at the inputs of the layers that read them, after pooling), ``"both"`` (the
two pooled together; skmerge's default) and ``"pre_and_post_activation"``
(where they are formed and at the inputs of the nonlinearities on the way,
pooled). Alignment data: 3,000 held-out training images; BatchNorm
statistics re-estimated on them; test accuracy on the 10,000 test images.

Writes ``benchmarks/results/converged.json`` and
``docs/_generated/benchmarks/converged_{meta,tables,findings,repair,placements,aligners}.inc``. Run::

    python benchmarks/converged.py                    # every family: ResNet20 x1 about 15 min per placement, VGG11 x1/4 1-3 min
    python benchmarks/converged.py --families resnet20-x1 --taps formed
    python benchmarks/converged.py --taps pre_and_post_activation --parts main --missing  # one placement added
    python benchmarks/converged.py --parts reference  # only the ridge CCA column, other results kept
    python benchmarks/converged.py --parts reference-both --missing  # the ridge CCA observed at taps=both
    python benchmarks/converged.py --parts repair --missing  # only the REPAIR columns
    python benchmarks/converged.py --parts aligners --missing  # only optimal transport and Procrustes
    python benchmarks/converged.py --families resnet20-x2 --missing --sets 1+2,0+3  # some sets; runs
                                                      # of one family with other --sets may share the machine
    python benchmarks/converged.py --tables-only      # rewrite the tables from the json
"""

from __future__ import annotations

import _common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from _reference_cca import GAMMAS, RidgeCCAAligner  # noqa: E402
from _base_models import FAMILIES, accuracy, available_seeds, load_base_models  # noqa: E402
from _common import (GENERATED, RESULTS, machine_info, machine_line, read_json, rst_table,  # noqa: E402
                     setup_torch, update_families, write_text)
from skmerge import (CCAAligner, IdentityAligner, ModelMerger, OptimalTransportAligner,  # noqa: E402
                     PermutationAligner, ProcrustesAligner)
from skmerge.batchnorm import has_batchnorm  # noqa: E402
from skmerge.graph import find_spaces  # noqa: E402
from skmerge.graph._walk import DEFAULT_TAPS, TAPS  # noqa: E402

OUTPUT = RESULTS / "converged.json"
#: Regularization grid of the tuned CCA (chosen on the validation images).
GRID = (0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0)
N_ALIGN = 3000
PARTS = ("main", "reference", "reference-both", "repair", "aligners", "dead-channels")
#: The aligners of ``--parts aligners`` (key, label, aligner), at the default placement.
OTHER_ALIGNERS = (("optimal_transport", "optimal transport", OptimalTransportAligner),
                  ("procrustes", "Procrustes", ProcrustesAligner))
#: ``--parts aligners``, families without BatchNorm: optimal transport followed by REPAIR.
OT_REPAIR = "optimal_transport_repair"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=None,
                        help="comma-separated (default: every family with two or more checkpoints)")
    parser.add_argument("--taps", default=",".join(TAPS), help=f"comma-separated, from {', '.join(TAPS)}")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated, from main (every aligner and placement), reference (the "
                             "ridge CCA of the reference code, at formed), reference-both (the same "
                             "observed at taps=both) and repair (REPAIR after "
                             "permutation and CCA, at formed, families without BatchNorm), aligners "
                             "(optimal transport and Procrustes at the default placement; without "
                             "BatchNorm also optimal transport + REPAIR) and "
                             "dead-channels (per model, the share of ReLU channels never active on the "
                             "alignment images); results of parts not run are kept")
    parser.add_argument("--missing", action="store_true",
                        help="only the sets and parts that have no results yet (e.g. after training more seeds)")
    parser.add_argument("--sets", default=None,
                        help="comma-separated sets of seeds to merge, e.g. 0+3,1+2 (default: every pair and "
                             "all of a family's models); lets runs of one family share the machine")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tables-only", action="store_true")
    args = parser.parse_args(argv)
    args.taps = args.taps.split(",")
    args.parts = args.parts.split(",")
    if unknown := [p for p in args.parts if p not in PARTS]:
        parser.error(f"unknown parts {unknown}")
    if unknown := [t for t in args.taps if t not in TAPS]:
        parser.error(f"unknown taps {unknown}")
    return args


def _head(dataset: TensorDataset, start: int, stop: int) -> TensorDataset:
    return TensorDataset(*(t[start:stop] for t in dataset.tensors))


def scales_as_vectors(spaces) -> list:
    """The spaces with their scale slices turned into plain vector slices (the ablation)."""
    return [dataclasses.replace(s, producers=[dataclasses.replace(sl, scale=False) for sl in s.producers])
            for s in spaces]


def merge_set(models, spaces, align, validation, test, ablation: bool = False) -> dict:
    """Test accuracies of one set of models merged with every aligner."""
    out = {}
    common = dict(spaces=spaces, device="cpu", verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = ModelMerger(models, PermutationAligner(), **common).fit(align)
        out["permutation"] = accuracy(merger.merged_model_, test)
        merger = ModelMerger(models, CCAAligner(), **common).fit(align)
        out["cca_default"] = accuracy(merger.merged_model_, test)
        scores = {}
        for r in GRID:
            merger.refit(align, aligner=CCAAligner(regularization=r))
            scores[r] = accuracy(merger.merged_model_, validation)
        best = max(GRID, key=lambda r: (scores[r], -abs(r - 0.3)))
        merger.refit(align, aligner=CCAAligner(regularization=best))
        out["cca_tuned"] = accuracy(merger.merged_model_, test)
        out["cca_tuned_regularization"] = best
        out["cca_validation"] = {str(r): s for r, s in scores.items()}
        if ablation:
            merger = ModelMerger(models, CCAAligner(), **dict(common, spaces=scales_as_vectors(spaces)))
            out["cca_scales_as_vectors"] = accuracy(merger.fit(align).merged_model_, test)
    return out


def reference_set(models, spaces, align, validation, test) -> dict:
    """The ridge CCA of the reference code, its ``gamma`` picked on the validation images."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = ModelMerger(models, RidgeCCAAligner(GAMMAS[0]), spaces=spaces, device="cpu",
                             verbose=False).fit(align)
        scores = {GAMMAS[0]: accuracy(merger.merged_model_, validation)}
        for gamma in GAMMAS[1:]:
            merger.refit(align, aligner=RidgeCCAAligner(gamma))
            scores[gamma] = accuracy(merger.merged_model_, validation)
        best = max(GAMMAS, key=lambda g: (scores[g], -abs(np.log10(g) + 1)))  # ties: nearest 0.1
        merger.refit(align, aligner=RidgeCCAAligner(best))
        return {"ridge_cca": accuracy(merger.merged_model_, test), "ridge_cca_gamma": best,
                "ridge_cca_validation": {f"{g:g}": s for g, s in scores.items()}}


def repair_set(models, spaces, align, test) -> dict:
    """Permutation and CCA (default) followed by REPAIR, on the alignment images."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, aligner in (("permutation", PermutationAligner()), ("cca_default", CCAAligner())):
            merger = ModelMerger(models, aligner, spaces=spaces, repair=True, device="cpu", verbose=False)
            out[name] = accuracy(merger.fit(align).merged_model_, test)
    return out


def aligner_keys(models) -> list[str]:
    """The results of ``--parts aligners`` for a set: REPAIR after optimal transport without BatchNorm."""
    keys = [key for key, _, _ in OTHER_ALIGNERS]
    return keys if has_batchnorm(models[0]) else keys + [OT_REPAIR]


def aligners_set(models, spaces, align, test, done: dict | None = None) -> dict:
    """Optimal transport and Procrustes (their default settings): one statistics pass, then a refit;
    without BatchNorm also optimal transport followed by REPAIR. Only the results ``done`` lacks."""
    out = {"taps": DEFAULT_TAPS, **(done or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = None
        for key, _, make in OTHER_ALIGNERS:
            if key in out:
                continue
            if merger is None:
                merger = ModelMerger(models, make(), spaces=spaces, device="cpu", verbose=False).fit(align)
            else:
                merger.refit(align, aligner=make())
            out[key] = accuracy(merger.merged_model_, test)
        if OT_REPAIR in aligner_keys(models) and OT_REPAIR not in out:
            merger = ModelMerger(models, OptimalTransportAligner(), spaces=spaces, repair=True, device="cpu",
                                 verbose=False)
            out[OT_REPAIR] = accuracy(merger.fit(align).merged_model_, test)
    return out


def dead_channels(model, images, batch_size: int = 500) -> float | None:
    """The share of the channels of all ReLU calls that are zero on every image and position.

    Each call of an ``nn.ReLU`` module counts its channels (axis 1) once; a
    dead channel's pre-activation still varies, its output never does. None
    for a model without ``nn.ReLU`` modules (a GELU network).
    """
    active: dict = {}  # (module, call) -> channels ever positive
    calls: dict = {}

    def hook(module, _inputs, output):
        key = (id(module), calls.get(id(module), 0))
        calls[id(module)] = key[1] + 1
        axes = tuple(a for a in range(output.ndim) if a != 1)
        ever = (output > 0).any(dim=axes)
        active[key] = ever | active[key] if key in active else ever

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                calls.clear()
                model.eval()(images[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    total = sum(v.numel() for v in active.values())
    return float(sum(int((~v).sum()) for v in active.values()) / total) if total else None


def run_family(family: str, taps_list, results: dict, parts=PARTS, missing: bool = False,
               save=lambda: None, only=None) -> None:
    """Merge every set of the family's models; ``save()`` after each set (a long run keeps its sets)."""
    seeds = available_seeds(family)
    models, data = load_base_models(family, seeds)
    align = _head(data["heldout"], 0, N_ALIGN)
    validation = _head(data["heldout"], N_ALIGN, len(data["heldout"]))
    test = data["test"]
    fam = results.setdefault(family, {"label": FAMILIES[family].label, "seeds": seeds, "sets": {}})
    fam["seeds"] = seeds
    fam["base"] = [accuracy(m, test) for m in models]
    sets = list(itertools.combinations(range(len(models)), 2))
    if len(models) > 2:
        sets.insert(0, tuple(range(len(models))))  # all of them first: the headline of a family
    if only is not None:
        keys = {"+".join(str(seeds[i]) for i in members): members for members in sets}
        if unknown := [k for k in only if k not in keys]:
            raise SystemExit(f"{family}: no set {unknown}; sets of seeds {seeds}: {', '.join(keys)}")
        sets = [keys[k] for k in only]
    if "dead-channels" in parts and not (missing and "dead_channels" in fam):
        fam["dead_channels"] = [dead_channels(m, align.tensors[0]) for m in models]
        print(f"{family}: channels never active, per model: " +
              ", ".join("-" if d is None else f"{100 * d:.1f} %" for d in fam["dead_channels"]), flush=True)
    x_example = align.tensors[0][:8]
    for members in sets:
        key = "+".join(str(seeds[i]) for i in members)
        group = [models[i] for i in members]
        entry = fam["sets"].setdefault(key, {})
        if not (missing and "averaging" in entry):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                merged = ModelMerger(group, IdentityAligner(), device="cpu", verbose=False).fit(align)
            entry["averaging"] = accuracy(merged.merged_model_, test)
        entry["base_mean"] = float(np.mean([fam["base"][i] for i in members]))
        spaces = {}  # per placement, found once for the set

        def spaces_at(taps):
            if taps not in spaces:
                spaces[taps] = find_spaces(group[0], x_example, taps=taps)
            return spaces[taps]

        if "reference" in parts and not (missing and "reference" in entry):
            tick = time.perf_counter()
            entry["reference"] = reference_set(group, spaces_at("formed"), align, validation, test)
            entry["reference"]["seconds"] = round(time.perf_counter() - tick, 1)
            print(f"{family} {key} ridge CCA: {100 * entry['reference']['ridge_cca']:.2f} (gamma="
                  f"{entry['reference']['ridge_cca_gamma']:g}; {entry['reference']['seconds']} s)", flush=True)
        if "reference-both" in parts and not (missing and "reference_both" in entry):
            tick = time.perf_counter()
            entry["reference_both"] = reference_set(group, spaces_at("both"), align, validation, test)
            entry["reference_both"]["seconds"] = round(time.perf_counter() - tick, 1)
            print(f"{family} {key} ridge CCA, taps=both: {100 * entry['reference_both']['ridge_cca']:.2f} "
                  f"(gamma={entry['reference_both']['ridge_cca_gamma']:g}; "
                  f"{entry['reference_both']['seconds']} s)", flush=True)
        if "repair" in parts and not has_batchnorm(group[0]) and not (missing and "repair" in entry):
            tick = time.perf_counter()
            entry["repair"] = repair_set(group, spaces_at("formed"), align, test)
            entry["repair"]["seconds"] = round(time.perf_counter() - tick, 1)
            print(f"{family} {key} REPAIR: permutation {100 * entry['repair']['permutation']:.2f}, CCA "
                  f"{100 * entry['repair']['cca_default']:.2f} ({entry['repair']['seconds']} s)", flush=True)
        done = entry.get("aligners", {}) if missing and entry.get("aligners", {}).get("taps") == DEFAULT_TAPS \
            else {}
        if "aligners" in parts and not all(k in done for k in aligner_keys(group)):
            tick = time.perf_counter()
            entry["aligners"] = aligners_set(group, spaces_at(DEFAULT_TAPS), align, test,
                                             {k: v for k, v in done.items() if k != "seconds"})
            entry["aligners"]["seconds"] = round(time.perf_counter() - tick + done.get("seconds", 0), 1)
            print(f"{family} {key} taps={DEFAULT_TAPS}: " + ", ".join(
                f"{k} {100 * entry['aligners'][k]:.2f}" for k in aligner_keys(group)) +
                f" ({entry['aligners']['seconds']} s)", flush=True)
        for taps in taps_list if "main" in parts else ():
            if missing and taps in entry:
                continue
            tick = time.perf_counter()
            entry[taps] = merge_set(group, spaces_at(taps), align, validation, test, ablation=taps == "formed")
            entry[taps]["seconds"] = round(time.perf_counter() - tick, 1)
            print(f"{family} {key} taps={taps}: " + ", ".join(
                f"{k} {100 * v:.2f}" for k, v in entry[taps].items()
                if k in ("permutation", "cca_default", "cca_tuned", "cca_scales_as_vectors")) +
                f" (r={entry[taps]['cca_tuned_regularization']}; averaging {100 * entry['averaging']:.2f}; "
                f"{entry[taps]['seconds']} s)", flush=True)
        save()


# --------------------------------------------------------------------------
# tables


def _in_order(results: dict) -> list:
    """The families of the results in the order of ``FAMILIES`` (the order they are trained in)."""
    rank = {name: i for i, name in enumerate(FAMILIES)}
    return sorted(results["families"].items(), key=lambda item: rank.get(item[0], len(rank)))


def _pct(values) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def _reference_cells(entries, taps: str) -> list[str]:
    """The ridge CCA's cells: on the ``formed`` rows (where it is observed), where every set has them."""
    if taps != "formed" or not all("reference" in e for e in entries):
        return ["-", "-"]
    gammas = sorted({e["reference"]["ridge_cca_gamma"] for e in entries})
    return [_pct([e["reference"]["ridge_cca"] for e in entries]), ", ".join(f"{g:g}" for g in gammas)]


def tables(results: dict) -> tuple[str, str]:
    meta = results["machine"]
    header = ["models", "merged", "base (mean)", "averaging", "taps", "permutation",
              "CCA (r=0.3)", "CCA (tuned r)", "tuned r", "CCA (r=0.3), scales as vectors",
              "ridge CCA (best gamma)", "best gamma"]
    rows = []
    for family, fam in _in_order(results):
        for size in sorted({len(k.split("+")) for k in fam["sets"]}):
            every = [e for k, e in fam["sets"].items() if len(k.split("+")) == size]
            for taps in TAPS:
                entries = [e for e in every if taps in e]  # a placement may have been run on some sets only
                if not entries:
                    continue
                what = f"{size} ({len(entries)} set{'s' if len(entries) > 1 else ''})"
                rs = sorted({e[taps]["cca_tuned_regularization"] for e in entries})
                rows.append([fam["label"], what, _pct([e["base_mean"] for e in entries]),
                             _pct([e["averaging"] for e in entries]), f"``{taps}``",
                             _pct([e[taps]["permutation"] for e in entries]),
                             _pct([e[taps]["cca_default"] for e in entries]),
                             _pct([e[taps]["cca_tuned"] for e in entries]),
                             ", ".join(f"{r:g}" for r in rs),
                             _pct([e[taps]["cca_scales_as_vectors"] for e in entries])
                             if all("cca_scales_as_vectors" in e[taps] for e in entries) else "-",
                             *_reference_cells(entries, taps)])
    table = rst_table(header, rows, stub_columns=1)
    families = "; ".join(f"{fam['label']} (seeds {', '.join(map(str, fam['seeds']))}: "
                         f"{', '.join(f'{100 * b:.2f}' for b in fam['base'])} %; " +
                         ", ".join(f"``{r['command']}`` {r['wall_minutes']:.0f} min" for r in fam["runs"]) + ")"
                         for _, fam in _in_order(results))
    meta_text = (f"Base models: {families}. Alignment on {N_ALIGN:,} held-out training images, the "
                 f"regularization of the tuned CCA chosen from {', '.join(map(str, GRID))} and the "
                 f"ridge CCA's gamma from {GAMMAS[0]:g}, {GAMMAS[1]:g}, ..., {GAMMAS[-1]:g} on the other "
                 f"2,000, test accuracy on the 10,000 test images (mean ± std over the sets of models). "
                 f"{machine_line(meta)}\n")
    return meta_text, table


def repair_table(results: dict) -> str:
    """Permutation and CCA with and without REPAIR (at ``formed``), sets where both were run."""
    header = ["models", "merged", "base (mean)", "permutation", "permutation + REPAIR", "CCA (r=0.3)",
              "CCA (r=0.3) + REPAIR", "best, % of base"]
    rows = []
    for _, fam in _in_order(results):
        for size in sorted({len(k.split("+")) for k in fam["sets"]}):
            entries = [e for k, e in fam["sets"].items()
                       if len(k.split("+")) == size and "repair" in e and "formed" in e]
            if not entries:
                continue
            cells = {"permutation": [e["formed"]["permutation"] for e in entries],
                     "permutation + REPAIR": [e["repair"]["permutation"] for e in entries],
                     "CCA": [e["formed"]["cca_default"] for e in entries],
                     "CCA + REPAIR": [e["repair"]["cca_default"] for e in entries]}
            base = float(np.mean([e["base_mean"] for e in entries]))
            best = max(float(np.mean(v)) for v in cells.values())
            rows.append([fam["label"], f"{size} ({len(entries)} set{'s' if len(entries) > 1 else ''})",
                         _pct([e["base_mean"] for e in entries]), *(_pct(v) for v in cells.values()),
                         f"{100 * best / base:.0f}"])
    return rst_table(header, rows, stub_columns=1) if rows else "(no REPAIR results yet)\n"


def aligners_table(results: dict) -> str:
    """Every aligner at the default placement on the sets where the other aligners were run."""
    # the OT + REPAIR column only once it was measured somewhere (families without BatchNorm)
    repair_column = any(OT_REPAIR in e.get("aligners", {})
                        for fam in results["families"].values() for e in fam["sets"].values())
    header = ["models", "merged", "base (mean)", "permutation", "CCA (r=0.3)",
              *(label for _, label, _ in OTHER_ALIGNERS),
              *(["optimal transport + REPAIR (no BatchNorm)"] if repair_column else []),
              "best", "best, % of base"]
    labels = {"permutation": "permutation", "cca_default": "CCA (r=0.3)",
              **{k: label for k, label, _ in OTHER_ALIGNERS}, OT_REPAIR: "optimal transport + REPAIR"}
    rows = []
    for _, fam in _in_order(results):
        for size in sorted({len(k.split("+")) for k in fam["sets"]}):
            entries = [e for k, e in fam["sets"].items() if len(k.split("+")) == size
                       and e.get("aligners", {}).get("taps") == DEFAULT_TAPS and DEFAULT_TAPS in e]
            if not entries:
                continue
            cells = {m: [e[DEFAULT_TAPS][m] for e in entries] for m in ("permutation", "cca_default")}
            cells.update({k: [e["aligners"][k] for e in entries] for k, _, _ in OTHER_ALIGNERS})
            repaired = all(OT_REPAIR in e["aligners"] for e in entries)
            if repaired:
                cells[OT_REPAIR] = [e["aligners"][OT_REPAIR] for e in entries]
            base = float(np.mean([e["base_mean"] for e in entries]))
            best = max(cells, key=lambda m: float(np.mean(cells[m])))
            shown = [_pct(v) for v in cells.values()] + (["-"] if repair_column and not repaired else [])
            rows.append([fam["label"], f"{size} ({len(entries)} set{'s' if len(entries) > 1 else ''})",
                         _pct([e["base_mean"] for e in entries]), *shown,
                         labels[best], f"{100 * float(np.mean(cells[best])) / base:.0f}"])
    return rst_table(header, rows, stub_columns=1) if rows else "(no results of the other aligners yet)\n"


def placement_table(results: dict) -> str:
    """Each placement against ``formed`` on the same sets, for permutation and CCA (r=0.3)."""
    others = [f"``{t}``" for t in TAPS[1:]]
    header = ["models", "merged", "permutation, ``formed``", *others, "CCA (r=0.3), ``formed``", *others,
              "best for CCA",
              "CCA (r=0.3) ``both`` / ridge CCA (best gamma), same sets", "CCA ``both`` >= ridge CCA",
              "ridge CCA observed at ``both``, same sets"]
    rows = []
    for _, fam in _in_order(results):
        for size in sorted({len(k.split("+")) for k in fam["sets"]}):
            entries = [e for k, e in fam["sets"].items() if len(k.split("+")) == size and "formed" in e]
            if not any(t in e for e in entries for t in TAPS[1:]):
                continue
            cells, cca = [], {"formed": float(np.mean([e["formed"]["cca_default"] for e in entries]))}
            for method in ("permutation", "cca_default"):
                cells.append(_pct([e["formed"][method] for e in entries]))
                for t in TAPS[1:]:
                    paired = [e for e in entries if t in e]
                    if not paired:
                        cells.append("-")
                        continue
                    delta = 100 * float(np.mean([e[t][method] - e["formed"][method] for e in paired]))
                    cells.append(f"{delta:+.1f} ({len(paired)})")
                    if method == "cca_default":
                        cca[t] = cca["formed"] + delta / 100
            with_ridge = [e for e in entries if "both" in e and "reference" in e]
            ridge = (f"{100 * np.mean([e['both']['cca_default'] for e in with_ridge]):.1f} / "
                     f"{100 * np.mean([e['reference']['ridge_cca'] for e in with_ridge]):.1f}"
                     if with_ridge else "-")
            beats = (f"{sum(e['both']['cca_default'] >= e['reference']['ridge_cca'] for e in with_ridge)} "
                     f"of {len(with_ridge)}" if with_ridge else "-")
            at_both = [e for e in with_ridge if "reference_both" in e]
            wins = sum(e["both"]["cca_default"] >= e["reference_both"]["ridge_cca"] for e in at_both)
            ridge_both = (f"{100 * np.mean([e['reference_both']['ridge_cca'] for e in at_both]):.1f} "
                          f"(CCA at least as good in {wins} of {len(at_both)})" if at_both else "-")
            rows.append([fam["label"], f"{size} ({len(entries)} set{'s' if len(entries) > 1 else ''})",
                         *cells, " = ".join(f"``{t}``" for t, v in cca.items() if v >= max(cca.values()) - 5e-4),
                         ridge, beats, ridge_both])
    if not rows:
        return "(no other placement measured yet)\n"
    note = ("Points against ``formed`` on the sets measured at both placements (their number in "
            "parentheses); \"best for CCA\" compares ``formed``'s mean with ``formed`` plus each mean "
            "difference; the last columns compare CCA (r=0.3) observed at ``both`` with the reference's "
            "ridge CCA at its best gamma (observed where the reference code observes, ``formed``), set "
            "by set, and with the ridge CCA observed at ``both`` too (``--parts reference-both``).\n\n")
    summary = ""
    for t in TAPS[1:]:
        paired = [e for fam in results["families"].values() for e in fam["sets"].values()
                  if t in e and "formed" in e]
        if t == "consumers" or not paired:
            continue
        counts = [f"{METHODS[m]} {sum(e[t][m] >= e['formed'][m] for e in paired)} of {len(paired)}"
                  for m in ("cca_default", "permutation")]
        summary += f"\n``{t}`` at least as good as ``formed``, set by set over every family: " + "; ".join(counts) + ".\n"
    return note + rst_table(header, rows, stub_columns=1) + summary + dead_channel_split(results)


def dead_channel_split(results: dict, taps: str = "pre_and_post_activation") -> str:
    """``taps`` against ``formed`` (CCA) on the sets with and without each family's deadest model."""
    parts = []
    for _, fam in _in_order(results):
        dead = fam.get("dead_channels")
        entries = {k: e for k, e in fam["sets"].items() if taps in e and "formed" in e}
        if not dead or None in dead or max(dead) == 0 or not entries:
            continue
        index = int(np.argmax(dead))
        worst = str(fam["seeds"][index])
        split = {True: [], False: []}
        for key, e in entries.items():
            split[worst in key.split("+")].append(100 * (e[taps]["cca_default"] - e["formed"]["cca_default"]))
        cells = [f"{np.mean(v):+.1f} ({len(v)})" if v else "-" for v in (split[True], split[False])]
        others = ", ".join(f"{100 * d:.0f}" for i, d in enumerate(dead) if i != index)
        parts.append(f"{fam['label']}: model {worst} ({100 * dead[index]:.0f} %; the others {others} %) "
                     f"{cells[0]} / {cells[1]}")
    if not parts:
        return ""
    return (f"\nChannels never active (ReLU outputs zero on every alignment image and position) and "
            f"``{taps}`` against ``formed`` for CCA (r=0.3), in points, on the sets that hold the "
            f"family's model with the most such channels / on the other sets (their number in "
            f"parentheses): " + "; ".join(parts) + ".\n")


METHODS = {"permutation": "permutation", "cca_default": "CCA (r=0.3)", "cca_tuned": "CCA (tuned r)"}


def findings(results: dict) -> str:
    """The ordering of the methods per family and number of models, in words (generated)."""
    lines = [f"What the table shows, at skmerge's default placement (``{DEFAULT_TAPS}``) on the sets "
             "measured there, the other placements against it on the same sets:", ""]
    for _, fam in _in_order(results):
        for size in sorted({len(k.split("+")) for k in fam["sets"]}):
            every = [e for k, e in fam["sets"].items() if len(k.split("+")) == size]
            entries = [e for e in every if DEFAULT_TAPS in e]
            if not entries:
                continue
            at = [e[DEFAULT_TAPS] for e in entries]
            means = {m: float(np.mean([a[m] for a in at])) for m in METHODS}
            order = sorted(means, key=means.get, reverse=True)
            base = float(np.mean([e["base_mean"] for e in entries]))
            wins = sum(a["cca_default"] >= a["permutation"] for a in at)
            sets = f"{len(entries)} set{'s' if len(entries) > 1 else ''}"
            text = (f"- {fam['label']}, {size} models" +
                    (f" ({sets} of {len(every)})" if len(entries) < len(every) else "") + ": " +
                    " > ".join(f"{METHODS[m]} {100 * means[m]:.1f}" for m in order) +
                    f"; the best keeps {100 * means[order[0]] / base:.0f} % of the base accuracy "
                    f"({100 * base:.1f}); CCA (r=0.3) at least as good as permutation in {wins} of {sets}.")
            deltas = []
            for t in (t for t in TAPS if t != DEFAULT_TAPS):
                paired = [e for e in entries if t in e]
                if not paired:
                    continue
                d = {m: 100 * float(np.mean([e[t][m] - e[DEFAULT_TAPS][m] for e in paired]))
                     for m in ("permutation", "cca_default")}
                deltas.append(f"``{t}`` {d['permutation']:+.1f} (permutation) / "
                              f"{d['cca_default']:+.1f} (CCA)" +
                              (f" on {len(paired)} of the sets" if len(paired) < len(entries) else ""))
            if deltas:
                text += f" Other placements, points against ``{DEFAULT_TAPS}``: " + ", ".join(deltas) + "."
            if all("reference" in e for e in entries):
                ridge = 100 * float(np.mean([e["reference"]["ridge_cca"] for e in entries]))
                beats = sum(a["cca_default"] >= e["reference"]["ridge_cca"] for a, e in zip(at, entries))
                tuned = sum(a["cca_tuned"] >= e["reference"]["ridge_cca"] for a, e in zip(at, entries))
                text += (f" The reference's ridge CCA with its best gamma (observed at ``formed``, where "
                         f"the reference code observes) gets {ridge:.1f}; CCA (r=0.3) at least as good in "
                         f"{beats} of {len(entries)}, CCA (tuned r) in {tuned}.")
            if all(e.get("aligners", {}).get("taps") == DEFAULT_TAPS for e in entries):
                other = {label: 100 * float(np.mean([e["aligners"][k] for e in entries]))
                         for k, label, _ in OTHER_ALIGNERS}
                if all(OT_REPAIR in e["aligners"] for e in entries):
                    other["optimal transport + REPAIR"] = 100 * float(np.mean(
                        [e["aligners"][OT_REPAIR] for e in entries]))
                every_aligner = {**{METHODS[m]: 100 * means[m] for m in ("permutation", "cca_default")},
                                 **other}
                best = max(every_aligner, key=every_aligner.get)
                listed = ", ".join(f"{label} {v:.1f}" for label, v in other.items())
                text += (" " + listed[0].upper() + listed[1:]
                         + f"; of these and the two above, {best} keeps the most "
                         f"({every_aligner[best] / base:.0f} % of the base accuracy).")
            formed = [e["formed"] for e in every if "formed" in e]
            if formed and all("cca_scales_as_vectors" in f for f in formed):
                vec = 100 * float(np.mean([f["cca_scales_as_vectors"] for f in formed]))
                diag = 100 * float(np.mean([f["cca_default"] for f in formed]))
                text += (f" At ``formed``, with the scales transformed as vectors CCA (r=0.3) gets "
                         f"{vec:.1f} ({diag - vec:+.1f} points for the diagonal rule).")
            lines.append(text)
    return "\n".join(lines) + "\n"


def write_tables(results: dict) -> None:
    meta, table = tables(results)
    write_text(GENERATED / "converged_meta.inc", meta)
    write_text(GENERATED / "converged_tables.inc", table)
    write_text(GENERATED / "converged_findings.inc", findings(results))
    write_text(GENERATED / "converged_repair.inc", repair_table(results))
    write_text(GENERATED / "converged_placements.inc", placement_table(results))
    write_text(GENERATED / "converged_aligners.inc", aligners_table(results))


def _keep_their_sets(_name: str, on_disk: dict | None, mine: dict) -> dict:
    """My family, in place, with the sets and runs that another run of it wrote meanwhile (``--sets``).

    In place: the run goes on filling the same dict.
    """
    if on_disk is None:
        return mine
    for key, entry in on_disk.get("sets", {}).items():  # their parts of a set are kept, mine win
        mine["sets"][key] = {**entry, **mine["sets"].get(key, {})}
    commands = {r["command"] for r in mine.get("runs", [])}
    mine["runs"] = [r for r in on_disk.get("runs", []) if r["command"] not in commands] + mine.get("runs", [])
    return mine


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tables_only:
        write_tables(read_json(OUTPUT))
        return
    setup_torch(args.threads)
    families = args.families.split(",") if args.families else [
        f for f in FAMILIES if len(available_seeds(f)) >= 2]
    results = read_json(OUTPUT) if OUTPUT.exists() else {"families": {}}
    command = " ".join(["python benchmarks/converged.py", *(sys.argv[1:] if argv is None else argv)])
    for family in families:
        start = time.perf_counter()
        # a rerun replaces the record of the same command; --missing runs add up (each did other sets)
        earlier = [r for r in results["families"].get(family, {}).get("runs", [])
                   if r["command"] != command or args.missing]

        def save(family=family, start=start, earlier=earlier):
            nonlocal results
            fam = results["families"][family]
            fam["runs"] = earlier + [{"command": command, "wall_minutes": (time.perf_counter() - start) / 60}]
            results = update_families(OUTPUT, {family: fam}, machine=machine_info(), merge=_keep_their_sets)

        run_family(family, args.taps, results["families"], args.parts, args.missing, save,
                   only=args.sets.split(",") if args.sets else None)
        save()
    write_tables(results)



if __name__ == "__main__":
    main()
