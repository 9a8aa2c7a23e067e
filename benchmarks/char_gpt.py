"""Merging character-level GPTs: every aligner on small language models.

Four :class:`_char_lm.CharGPT` models (4 pre-norm blocks of width 128 with 4
causal attention heads of 32, MLP 512, context 128, output layer untied from
the token embedding; 0.84 M parameters) are trained from different seeds
(initialization and order of the training windows) on the same text: the
``fortunes`` corpus of ``_char_lm`` (Debian's ``fortunes`` package, 2.3 M
training characters). They are stored in half precision under
``benchmarks/models/char-gpt/`` with ``MANIFEST.json`` (recipe, scores,
training time, command), once; later runs reuse them (``--force`` retrains).

Every pair of models and all four are merged with ``ModelMerger``:

* ``IdentityAligner()`` (plain averaging of the parameters),
* ``PermutationAligner()``,
* ``CCAAligner()`` at its default regularization, and with the
  regularization picked on validation windows (every grid point a
  :meth:`~skmerge.ModelMerger.refit` of the same statistics),
* the CCA of the reference code as a formula (``_reference_cca.RidgeCCAAligner``:
  the absolute ridge ``S + gamma I``), ``gamma`` picked from the reference's
  grid ``1e-6 ... 1e7`` on the validation windows,
* ``ProcrustesAligner()`` (orthogonal maps with a scale),
* ``OptimalTransportAligner()``,

with the spaces :func:`skmerge.graph.find_spaces` finds (the residual stream,
a query-key and a value-output space per block with the heads matched as
wholes, the MLP's hidden units). Alignment data: 600 windows of 128
characters of the held-out split (76,800 positions); validation: the other
392 held-out windows; scores: bits per character on the 1,024 test windows
(lower is better), next to the base models' mean and the ensemble (mean of
the models' next-character probabilities, which runs every model).

Writes ``benchmarks/results/char_gpt.json`` and
``docs/_generated/benchmarks/char_gpt_{meta,tables}.inc``. Needs the corpus
(``apt-get install fortunes``). Run::

    python benchmarks/char_gpt.py --threads 1          # trains the missing models (about 13 min each), merges (minutes)
    python benchmarks/char_gpt.py --parts train --seeds 0,1   # train some models (runs may share the machine)
    python benchmarks/char_gpt.py --parts merge        # merge the committed models
    python benchmarks/char_gpt.py --tables-only
"""

from __future__ import annotations

import _common  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import argparse  # noqa: E402
import fcntl  # noqa: E402
import itertools  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _char_lm import (CharGPT, bits_per_character, ensemble_bits_per_character, load_corpus,  # noqa: E402
                      train_char_gpt, windows)
from _reference_cca import GAMMAS, RidgeCCAAligner  # noqa: E402
from _common import (GENERATED, HERE, RESULTS, machine_info, machine_line, read_json,  # noqa: E402
                     rst_table, setup_torch, write_json, write_text)
from skmerge import ModelMerger  # noqa: E402
from skmerge.aligners import (CCAAligner, IdentityAligner, OptimalTransportAligner,  # noqa: E402
                              PermutationAligner, ProcrustesAligner)
from skmerge.training import load_checkpoint, save_checkpoint  # noqa: E402

MODELS_DIR = HERE / "models" / "char-gpt"
MANIFEST = MODELS_DIR / "MANIFEST.json"
OUTPUT = RESULTS / "char_gpt.json"
SEEDS = (0, 1, 2, 3)
MODEL_KWARGS = {"context": 128, "dim": 128, "depth": 4, "heads": 4, "mlp_ratio": 4, "tied": False}
RECIPE = {"steps": 4000, "batch_size": 32, "lr": 3e-3, "weight_decay": 0.1, "warmup_fraction": 0.05}
N_ALIGN = 600
#: Regularization grid of the tuned CCA (chosen on the validation windows).
GRID = (0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0)
#: Largest accepted change of the test bits per character from storing the weights in float16.
FP16_TOLERANCE = 0.002
PARTS = ("train", "merge")
#: ``space_aligners`` of the mixed columns: the MLP's hidden units permuted, the other spaces mapped densely.
MLP_PERMUTED = [("*mlp*", PermutationAligner())]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: train, merge")
    parser.add_argument("--seeds", default=None, help="models to train (default: 0,1,2,3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--force", action="store_true", help="retrain models whose checkpoint exists")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the tables from the json")
    args = parser.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    if unknown := sorted(set(args.parts) - set(PARTS)):
        parser.error(f"unknown parts {unknown}")
    args.seeds = SEEDS if args.seeds is None else tuple(int(s) for s in args.seeds.split(","))
    return args


def checkpoint(seed: int):
    return MODELS_DIR / f"seed{seed}.pt"


def build(vocab_size: int) -> CharGPT:
    return CharGPT(vocab_size, **MODEL_KWARGS)


# --------------------------------------------------------------------------
# training


def train(seeds, corpus: dict, force: bool, threads: int) -> None:
    """Train the missing models, store them in float16 and record them in the manifest."""
    test_x, test_y = windows(corpus["test"], MODEL_KWARGS["context"])
    for seed in seeds:
        path = checkpoint(seed)
        if path.exists() and not force:
            print(f"seed {seed}: {path} exists (--force retrains)", flush=True)
            continue
        torch.manual_seed(seed)
        model = build(len(corpus["vocab"]))
        print(f"seed {seed}: training {RECIPE['steps']} steps", flush=True)
        record = train_char_gpt(model, corpus["train"], seed=seed, log_every=100, **RECIPE)
        bpc32 = bits_per_character(model, test_x, test_y)
        state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
        reloaded = model_from_state(state, len(corpus["vocab"]))
        bpc16 = bits_per_character(reloaded, test_x, test_y)
        if abs(bpc16 - bpc32) > FP16_TOLERANCE:
            raise RuntimeError(f"seed {seed}: float16 weights change the test score by {bpc16 - bpc32:+.4f}")
        meta = {"family": "char-gpt", "seed": seed, "model_kwargs": MODEL_KWARGS, "recipe": RECIPE,
                "vocab": corpus["vocab"], "test_bits_per_character": round(bpc16, 4),
                "test_bits_per_character_float32": round(bpc32, 4)}
        save_checkpoint(state, path, **meta)
        record_in_manifest(seed, path, meta, record, corpus, threads, model)
        print(f"seed {seed}: test {bpc16:.4f} bits/char ({record['train_seconds']} s)", flush=True)


def record_in_manifest(seed, path, meta, record, corpus, threads, model) -> None:
    """Add one model to the manifest, under a lock (training runs may share the machine)."""
    with open(MODELS_DIR / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_json(MANIFEST) if MANIFEST.exists() else {}
        manifest.update({
            "description": "Character-level GPTs of benchmarks/char_gpt.py: float16 state_dicts "
                           "(skmerge.training.save_checkpoint) of _char_lm.CharGPT(len(vocab), **model_kwargs)",
            "corpus": {k: v for k, v in corpus["info"].items()},
            "model_kwargs": MODEL_KWARGS, "recipe": RECIPE,
            "parameters": sum(p.numel() for p in model.parameters()),
            "regenerate": "python benchmarks/char_gpt.py --parts train --force --threads 1"})
        manifest.setdefault("seeds", {})[str(seed)] = {
            "file": path.name, "bytes": path.stat().st_size,
            "test_bits_per_character": meta["test_bits_per_character"],
            "test_bits_per_character_float32": meta["test_bits_per_character_float32"],
            "final_train_loss": round(record["final_train_loss"], 4),
            "train_seconds": record["train_seconds"], "threads": threads,
            "date": machine_info()["date"],
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
        write_json(MANIFEST, manifest)


def model_from_state(state: dict, vocab_size: int) -> CharGPT:
    model = build(vocab_size)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def load_models(vocab: str) -> list[CharGPT]:
    models = []
    for seed in SEEDS:
        state, meta = load_checkpoint(checkpoint(seed))
        if meta.get("vocab") != vocab:
            raise ValueError(f"{checkpoint(seed)} was trained on another vocabulary: the corpus changed")
        models.append(model_from_state(state, len(vocab)))
    return models


# --------------------------------------------------------------------------
# merging


def merge_set(models, align, validation, test) -> dict:
    """Test bits per character of one set of models merged with every aligner."""
    out = {}
    common = dict(device="cpu", verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, aligner, mixed in (("averaging", IdentityAligner(), None),
                                     ("permutation", PermutationAligner(), None),
                                     ("procrustes", ProcrustesAligner(), None),
                                     ("procrustes_mlp_permuted", ProcrustesAligner(), MLP_PERMUTED),
                                     ("optimal_transport", OptimalTransportAligner(), None),
                                     ("cca_mlp_permuted", CCAAligner(), MLP_PERMUTED),
                                     ("cca_default", CCAAligner(), None)):
            tick = time.perf_counter()
            merger = ModelMerger(models, aligner, space_aligners=mixed, **common).fit(align)
            out[name] = bits_per_character(merger.merged_model_, *test)
            out[f"{name}_seconds"] = round(time.perf_counter() - tick, 1)
            if name != "averaging":
                out.setdefault("aligned_alone", {})[name] = aligned_alone(merger, len(models), test)
        best, scores = tune(merger, align, GRID, CCAAligner, validation, tie=lambda r: abs(r - 0.3))
        out["cca_tuned"] = bits_per_character(merger.merged_model_, *test)
        out["cca_tuned_regularization"] = best
        out["cca_validation"] = {str(r): s for r, s in scores.items()}
        best, ridge = tune(merger, align, GAMMAS, RidgeCCAAligner, validation,
                           tie=lambda g: abs(np.log10(g) + 1))  # ties: nearest 0.1
        out["ridge_cca"] = bits_per_character(merger.merged_model_, *test)
        out["ridge_cca_gamma"] = best
        out["ridge_cca_validation"] = {f"{g:g}": v for g, v in ridge.items()}
    return out


def tune(merger, align, candidates, make_aligner, validation, tie):
    """Refit ``merger`` with ``make_aligner(c)`` for every candidate, keep the best on ``validation``.

    Returns the best candidate (ties broken by ``tie(c)``) and every score;
    the merger is left refitted with the best one.
    """
    scores = {}
    for candidate in candidates:
        merger.refit(align, aligner=make_aligner(candidate))
        scores[candidate] = bits_per_character(merger.merged_model_, *validation)
    best = min(candidates, key=lambda c: (scores[c], tie(c)))
    merger.refit(align, aligner=make_aligner(best))
    return best, scores


def aligned_alone(merger, n_models: int, test) -> float:
    """Mean bits per character of the non-reference models in the reference's basis, each alone.

    Permutations keep each model's function exactly; a dense map does not
    commute with the nonlinearities, so this is what the transform alone
    costs, before any averaging.
    """
    states = merger.aligned_state_dicts()
    scores = []
    for k in range(1, n_models):
        model = build(merger.merged_model_.wte.num_embeddings)
        model.load_state_dict(states[k])
        scores.append(bits_per_character(model.eval(), *test))
    return float(np.mean(scores))


def merge(results: dict, corpus: dict) -> None:
    context = MODEL_KWARGS["context"]
    heldout_x, heldout_y = windows(corpus["heldout"], context)
    align = heldout_x[:N_ALIGN]
    validation = (heldout_x[N_ALIGN:], heldout_y[N_ALIGN:])
    test = windows(corpus["test"], context)
    models = load_models(corpus["vocab"])
    results["base"] = [bits_per_character(m, *test) for m in models]
    results["data"] = {"align_windows": len(align), "validation_windows": len(validation[0]),
                       "test_windows": len(test[0]), "context": context}
    sets = [tuple(range(len(models)))] + list(itertools.combinations(range(len(models)), 2))
    for members in sets:
        key = "+".join(str(SEEDS[i]) for i in members)
        group = [models[i] for i in members]
        tick = time.perf_counter()
        entry = merge_set(group, align, validation, test)
        entry["base_mean"] = float(np.mean([results["base"][i] for i in members]))
        entry["base_others"] = float(np.mean([results["base"][i] for i in members[1:]]))
        entry["ensemble"] = ensemble_bits_per_character(group, *test)
        entry["seconds"] = round(time.perf_counter() - tick, 1)
        results.setdefault("sets", {})[key] = entry
        print(f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in entry.items()
                                     if isinstance(v, float) and not k.endswith("seconds")), flush=True)
        write_json(OUTPUT, results)


# --------------------------------------------------------------------------
# tables

COLUMNS = [("averaging", "averaging"), ("permutation", "permutation"), ("cca_default", "CCA (r=0.3)"),
           ("cca_tuned", "CCA (tuned r)"), ("ridge_cca", "ridge CCA (best gamma)"), ("procrustes", "Procrustes"),
           ("optimal_transport", "optimal transport"), ("cca_mlp_permuted", "CCA (r=0.3), MLP permuted"),
           ("procrustes_mlp_permuted", "Procrustes, MLP permuted")]
#: Columns of the table of aligned models alone (no averaging).
ALONE = [("permutation", "permutation"), ("cca_default", "CCA (r=0.3)"), ("procrustes", "Procrustes"),
         ("optimal_transport", "optimal transport"), ("cca_mlp_permuted", "CCA (r=0.3), MLP permuted"),
         ("procrustes_mlp_permuted", "Procrustes, MLP permuted")]


def tables(results: dict) -> None:
    sets = results.get("sets", {})
    groups = [(n, label, [e for k, e in sets.items() if len(k.split("+")) == n])
              for n, label in ((2, "pairs"), (4, "all four"))]
    groups = [g for g in groups if g[2]]

    def cell(entries, get):
        values = [get(e) for e in entries if get(e) is not None]
        if not values:
            return "-"
        return f"{np.mean(values):.3f}" if len(values) == 1 else \
            f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    header = ["merge"] + [f"{n} models: {label} ({len(entries)})" for n, label, entries in groups]
    header += ["a model alone in the reference's basis (pairs)"]
    pairs = next((entries for n, _, entries in groups if n == 2), [])
    alone = dict(ALONE)
    rows = [["base models (mean)"] + [cell(e, lambda x: x["base_mean"]) for _, _, e in groups]
            + [cell(pairs, lambda x: x["base_others"])],
            ["ensemble (runs every model)"] + [cell(e, lambda x: x["ensemble"]) for _, _, e in groups] + ["-"]]
    for key, label in COLUMNS:
        row = [label] + [cell(e, lambda x, key=key: x[key]) for _, _, e in groups]
        row.append(cell(pairs, lambda x, key=key: x["aligned_alone"].get(key)) if key in alone else "-")
        rows.append(row)
    table = rst_table(header, rows, stub_columns=1) if groups else "(no results yet)\n"
    tuned = sorted({e["cca_tuned_regularization"] for e in sets.values()})
    gammas = sorted({e["ridge_cca_gamma"] for e in sets.values() if "ridge_cca_gamma" in e})
    text = (table + "\nTest bits per character (lower is better); for pairs the mean over the "
            "pairs and the range. \"MLP permuted\": ``space_aligners=[(\"*mlp*\", "
            "PermutationAligner())]``, the MLPs' hidden units matched one-to-one and the other "
            "spaces mapped densely. The last column is the second model of each pair expressed in "
            "the first one's basis (``aligned_state_dicts``), alone: what the transform costs before "
            "any averaging (permutations keep the function exactly). The tuned CCA picked "
            f"``regularization`` in {{{', '.join(f'{r:g}' for r in tuned)}}}, the ridge CCA "
            f"``gamma`` in {{{', '.join(f'{g:g}' for g in gammas)}}}.\n")
    write_text(GENERATED / "char_gpt_tables.inc", text)
    manifest = read_json(MANIFEST) if MANIFEST.exists() else {"seeds": {}}
    runs = results.get("runs", [])
    train_minutes = [r["train_seconds"] / 60 for r in manifest.get("seeds", {}).values()]
    meta = (f"Base models: {len(manifest.get('seeds', {}))} CharGPTs of "
            f"{manifest.get('parameters', 0) / 1e6:.2f} M parameters, "
            f"{manifest.get('recipe', {}).get('steps', 0)} AdamW steps of "
            f"{manifest.get('recipe', {}).get('batch_size', 0)} windows each"
            + (f" ({min(train_minutes):.0f}-{max(train_minutes):.0f} min per model on one thread)"
               if train_minutes else "")
            + f"; corpus {manifest.get('corpus', {}).get('characters', 0):,} characters, "
            f"vocabulary {manifest.get('corpus', {}).get('vocab_size', 0)}. "
            + (f"Merges: ``{runs[-1]['command']}``, {runs[-1]['seconds'] / 60:.0f} min; "
               f"{machine_line(runs[-1]['machine'])}" if runs else "") + "\n")
    write_text(GENERATED / "char_gpt_meta.inc", meta)
    write_text(GENERATED / "char_gpt_findings.inc", findings(sets))


def findings(sets: dict) -> str:
    """The ordering of the aligners, counted over the sets (written, not typed)."""
    if not sets:
        return "(no results yet)\n"
    names = dict(COLUMNS)
    lines = []
    for n, label in ((2, "pairs"), (4, "all four models")):
        entries = [e for k, e in sets.items() if len(k.split("+")) == n]
        if not entries:
            continue
        mean = {key: float(np.mean([e[key] for e in entries])) for key, _ in COLUMNS}
        order = sorted(mean, key=mean.get)
        ranking = ", then ".join(f"{names[k]} ({mean[k]:.3f})" for k in order)
        base = float(np.mean([e["base_mean"] for e in entries]))
        ensemble = float(np.mean([e["ensemble"] for e in entries]))
        cca_vs_perm = sum(e["cca_default"] <= e["permutation"] for e in entries)
        cca_vs_procrustes = sum(e["cca_default"] <= e["procrustes"] for e in entries)
        best = order[0]
        lines.append(
            f"* **{label.capitalize()}** ({len(entries)} set{'s' if len(entries) > 1 else ''}), mean test "
            f"bits per character, best first: {ranking}; the base models {base:.3f}, the ensemble "
            f"{ensemble:.3f}. The best merge costs {mean[best] - base:+.3f} bits per character "
            f"against the base models' mean ({100 * (mean[best] - base) / base:+.1f} %). CCA (r=0.3) "
            f"is at least as good as permutation matching in {cca_vs_perm} of {len(entries)} and as "
            f"Procrustes in {cca_vs_procrustes} of {len(entries)}."
            + (f" With the MLPs' hidden units permuted (the other spaces mapped densely), CCA (r=0.3) "
               f"goes from {mean['cca_default']:.3f} to {mean['cca_mlp_permuted']:.3f} and Procrustes "
               f"from {mean['procrustes']:.3f} to {mean['procrustes_mlp_permuted']:.3f}." if n == 2 else ""))
        if n == 2:
            alone = {key: float(np.mean([e["aligned_alone"][key] for e in entries])) for key, _ in ALONE}
            lines.append(
                f"* **One model in the other's basis, alone** (pairs): "
                f"{np.mean([e['base_others'] for e in entries]):.3f} bits per character "
                f"before the transform; after it, " + ", ".join(f"{names[k]} {alone[k]:.3f}" for k, _ in ALONE)
                + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_torch(args.threads)
    results = read_json(OUTPUT) if OUTPUT.exists() else {}
    if not args.tables_only:
        corpus = load_corpus()
        if "train" in args.parts:
            train(args.seeds, corpus, args.force, args.threads)
        if "merge" in args.parts:
            tick, machine = time.perf_counter(), machine_info()
            merge(results, corpus)
            results.setdefault("runs", []).append({
                "command": "python benchmarks/char_gpt.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                "machine": machine, "seconds": round(time.perf_counter() - tick, 1)})
            write_json(OUTPUT, results)
    tables(results)


if __name__ == "__main__":
    main()
