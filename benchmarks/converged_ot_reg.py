"""Optimal transport's entropic regularization on the converged base models.

``OptimalTransportAligner(reg=...)`` sets how soft the plan is: ``reg -> 0``
is permutation matching, larger values average each reference feature over
more features of the other model. On the committed checkpoints of
``benchmarks/models/`` (as in ``converged.py``: 3,000 held-out training
images to align, 2,000 others to choose on, the 10,000 test images to score)
each set of models is merged at every ``reg`` of a grid, at the default
placement; on the families without BatchNorm with REPAIR after the merge
(``repair=True``, without which soft plans merge to near chance there). Every
grid point after the first is a ``ModelMerger.refit`` of the same statistics.
The table gives the test accuracy at each ``reg`` and at the ``reg`` chosen on
the held-out images.

By default the first three pairs of seeds of each family and all its models
are merged (``--sets`` for others). Writes
``benchmarks/results/converged_ot_reg.json`` and
``docs/_generated/benchmarks/converged_ot_reg.inc``. Run::

    python benchmarks/converged_ot_reg.py --threads 1     # every family; on 2 shared cores about 50 min
                                                          # without ResNet20 x2, which takes 7-9 min a set
    python benchmarks/converged_ot_reg.py --families vgg11-ref-x0.25 --sets 0+1
    python benchmarks/converged_ot_reg.py --tables-only
"""

from __future__ import annotations

import _common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import argparse  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

from _base_models import FAMILIES, accuracy, available_seeds, load_base_models  # noqa: E402
from _common import (GENERATED, RESULTS, machine_info, machine_line, read_json, rst_table,  # noqa: E402
                     setup_torch, update_families, write_text)
from converged import N_ALIGN, _head, _in_order, _pct  # noqa: E402
from skmerge import ModelMerger, OptimalTransportAligner  # noqa: E402
from skmerge.batchnorm import has_batchnorm  # noqa: E402
from skmerge.graph import find_spaces  # noqa: E402
from skmerge.graph._walk import DEFAULT_TAPS  # noqa: E402

OUTPUT = RESULTS / "converged_ot_reg.json"
#: The grid of ``reg`` (the aligner's default, 0.05, among them).
REGS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
DEFAULT_REG = OptimalTransportAligner().reg


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=None,
                        help="comma-separated (default: every family with two or more checkpoints)")
    parser.add_argument("--sets", default=None,
                        help="comma-separated sets of seeds, e.g. 0+1,0+1+2 (default: the first three "
                             "pairs and all of a family's models)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tables-only", action="store_true")
    return parser.parse_args(argv)


def default_sets(n_models: int) -> list[tuple[int, ...]]:
    """All the models (when more than two), then the first three pairs."""
    pairs = list(itertools.combinations(range(n_models), 2))[:3]
    return ([tuple(range(n_models))] if n_models > 2 else []) + pairs


def sweep(models, spaces, align, validation, test) -> dict:
    """Validation and test accuracy at every ``reg``; REPAIR after the merge without BatchNorm."""
    repair = not has_batchnorm(models[0])
    out = {"repair": repair, "validation": {}, "test": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Sinkhorn at the smallest reg may stop at max_iter
        merger = None
        for reg in REGS:
            if merger is None:
                merger = ModelMerger(models, OptimalTransportAligner(reg=reg), spaces=spaces, repair=repair,
                                     device="cpu", verbose=False).fit(align)
            else:
                merger.refit(align, aligner=OptimalTransportAligner(reg=reg))
            out["validation"][str(reg)] = accuracy(merger.merged_model_, validation)
            out["test"][str(reg)] = accuracy(merger.merged_model_, test)
    # ties: the reg nearest the default (on a log scale)
    best = max(REGS, key=lambda r: (out["validation"][str(r)], -abs(np.log(r / DEFAULT_REG))))
    out["chosen_reg"] = best
    return out


def run_family(family: str, only, results: dict, save) -> None:
    seeds = available_seeds(family)
    models, data = load_base_models(family, seeds)
    align = _head(data["heldout"], 0, N_ALIGN)
    validation = _head(data["heldout"], N_ALIGN, len(data["heldout"]))
    test = data["test"]
    fam = results.setdefault(family, {"label": FAMILIES[family].label, "sets": {}})
    fam["seeds"] = seeds
    sets = default_sets(len(models))
    if only is not None:
        keys = {"+".join(map(str, s)): s for s in itertools.chain.from_iterable(
            itertools.combinations(seeds, k) for k in range(2, len(seeds) + 1))}
        if unknown := [k for k in only if k not in keys]:
            raise SystemExit(f"{family}: no set {unknown} of the seeds {seeds}")
        sets = [tuple(seeds.index(s) for s in keys[k]) for k in only]
    spaces = find_spaces(models[0], align.tensors[0][:8], taps=DEFAULT_TAPS)
    base = [accuracy(m, test) for m in models]
    for members in sets:
        key = "+".join(str(seeds[i]) for i in members)
        group = [models[i] for i in members]
        tick = time.perf_counter()
        entry = sweep(group, spaces, align, validation, test)
        entry["base_mean"] = float(np.mean([base[i] for i in members]))
        entry["seconds"] = round(time.perf_counter() - tick, 1)
        fam["sets"][key] = entry
        print(f"{family} {key}: " + ", ".join(f"reg={r} {100 * entry['test'][str(r)]:.2f}" for r in REGS) +
              f"; chosen {entry['chosen_reg']} ({entry['seconds']} s)", flush=True)
        save()


def table(results: dict) -> str:
    header = ["models", "merged", "REPAIR", "base (mean)", *(f"reg={r:g}" for r in REGS),
              "reg chosen on held-out images", "test at the chosen reg", "% of base"]
    rows = []
    for _, fam in _in_order(results):
        for size in sorted({len(k.split("+")) for k in fam["sets"]}):
            entries = [e for k, e in fam["sets"].items() if len(k.split("+")) == size]
            chosen = [e["test"][str(e["chosen_reg"])] for e in entries]
            base = float(np.mean([e["base_mean"] for e in entries]))
            rows.append([fam["label"], f"{size} ({len(entries)} set{'s' if len(entries) > 1 else ''})",
                         "yes" if entries[0]["repair"] else "no (BatchNorm)", _pct([e["base_mean"] for e in entries]),
                         *(_pct([e["test"][str(r)] for e in entries]) for r in REGS),
                         ", ".join(f"{r:g}" for r in sorted({e["chosen_reg"] for e in entries})),
                         _pct(chosen), f"{100 * float(np.mean(chosen)) / base:.0f}"])
    runs = "; ".join(f"{fam['label']}: " + ", ".join(f"``{r['command']}`` {r['wall_minutes']:.0f} min"
                                                     for r in fam["runs"]) for _, fam in _in_order(results))
    meta = (f"Test accuracy (%, mean ± std over the sets) of ``OptimalTransportAligner(reg=...)`` at the "
            f"default placement (``{DEFAULT_TAPS}``), the default ``reg={DEFAULT_REG:g}`` among them. "
            f"{machine_line(results['machine'])} Runs: {runs}.\n\n")
    return meta + rst_table(header, rows, stub_columns=1) + "\n" + findings(results)


def findings(results: dict) -> str:
    """Per family and number of models: the best ``reg`` on the test images, the chosen and the default."""
    lines = []
    for _, fam in _in_order(results):
        for size in sorted({len(k.split("+")) for k in fam["sets"]}):
            entries = [e for k, e in fam["sets"].items() if len(k.split("+")) == size]
            means = {r: 100 * float(np.mean([e["test"][str(r)] for e in entries])) for r in REGS}
            best = max(REGS, key=lambda r: means[r])
            base = 100 * float(np.mean([e["base_mean"] for e in entries]))
            chosen = 100 * float(np.mean([e["test"][str(e["chosen_reg"])] for e in entries]))
            lines.append(f"- {fam['label']}, {size} models: best on the test images ``reg={best:g}`` "
                         f"({means[best]:.1f}, {means[best] / base:.0%} of the base accuracy), chosen on "
                         f"the held-out images "
                         f"{chosen:.1f} ({chosen / base:.0%}), the default ``reg={DEFAULT_REG:g}`` "
                         f"{means[DEFAULT_REG]:.1f} ({means[DEFAULT_REG] / base:.0%}).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tables_only:
        write_text(GENERATED / "converged_ot_reg.inc", table(read_json(OUTPUT)))
        return
    setup_torch(args.threads)
    families = args.families.split(",") if args.families else [
        f for f in FAMILIES if len(available_seeds(f)) >= 2]
    results = read_json(OUTPUT) if OUTPUT.exists() else {"families": {}}
    command = " ".join(["python benchmarks/converged_ot_reg.py", *(sys.argv[1:] if argv is None else argv)])
    for family in families:
        start = time.perf_counter()
        earlier = [r for r in results["families"].get(family, {}).get("runs", []) if r["command"] != command]

        def save(family=family, start=start, earlier=earlier):
            nonlocal results
            fam = results["families"][family]
            fam["runs"] = earlier + [{"command": command, "wall_minutes": (time.perf_counter() - start) / 60}]
            results = update_families(OUTPUT, {family: fam}, machine=machine_info())

        run_family(family, args.sets.split(",") if args.sets else None, results["families"], save)
    write_text(GENERATED / "converged_ot_reg.inc", table(results))


if __name__ == "__main__":
    main()
