"""The documentation's generated parts: the benchmarks headline table, the front page, the gallery."""

import ast
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
HEADLINE = DOCS / "_generated" / "benchmarks" / "accuracy_headline.inc"
GALLERY = ROOT / "examples" / "gallery"
MERGES = ("identity", "permutation", "cca_auto", "cca_default", "cca_cv")


def parse_list_table(text: str) -> tuple[str, list[list[str]]]:
    """(title, rows) of a ``.. list-table::`` written by benchmarks/_common.rst_table."""
    title = re.match(r"\.\. list-table::(.*)\n", text).group(1).strip()
    rows = []
    for line in text.splitlines():
        if line.startswith("   * - "):
            rows.append([line[len("   * - "):]])
        elif line.startswith("     - "):
            rows[-1].append(line[len("     - "):])
    return title, [[cell.strip() for cell in row] for row in rows]


def test_headline_table_is_the_committed_results():
    """Every cell is the mean of the committed records; the best merge is in bold."""
    results = json.loads((ROOT / "benchmarks" / "results" / "accuracy.json").read_text())
    config = results["config"]
    title, (header, *rows) = parse_list_table(HEADLINE.read_text())
    n_small, n_large = min(config["n_models"]), max(config["n_models"])
    assert title == (f"Test accuracy (%) of {n_small} and {n_large} merged models, "
                     f"mean over {config['sets']} model sets")
    assert header[:4] == ["family", "merged models", "base models (mean)", "ensemble"]
    columns = ["base", "ensemble", *MERGES]
    assert len(header) == 2 + len(columns)
    families = list(results["families"].values())
    assert len(rows) == 2 * len(families)
    for i, row in enumerate(rows):
        family, n = families[i // 2], (n_small, n_large)[i % 2]
        assert row[0] == (family["label"] if i % 2 == 0 else "")
        assert row[1] == str(n)
        printed = {}
        for column, cell in zip(columns, row[2:]):
            values = [r["accuracy"] for r in family["records"] if r["experiment"] == "n_models"
                      and r["n_models"] == n and r["aligner"] == column]
            assert len(values) == config["sets"]
            assert cell.strip("*") == f"{100 * np.mean(values):.1f}", (family["label"], n, column)
            printed[column] = (float(cell.strip("*")), cell.startswith("**"))
        best = max(value for column, (value, _) in printed.items() if column in MERGES)
        for column, (value, bold) in printed.items():
            assert bold == (column in MERGES and value == best), (family["label"], n, column)


def test_disjoint_tasks_tables_are_the_committed_results():
    """Every cell of the disjoint-tasks tables is the committed record it names."""
    results = json.loads((ROOT / "benchmarks" / "results" / "disjoint_tasks.json").read_text())
    text = (DOCS / "_generated" / "benchmarks" / "disjoint_tasks_tables.inc").read_text()
    tables = [t for t in text.split(".. list-table::") if t.strip()]
    assert len(tables) == len(results["families"])
    for table, family in zip(tables, results["families"].values()):
        title, (header, *rows) = parse_list_table(".. list-table::" + table)
        assert title.startswith(family["label"])
        ns = sorted({r["n_models"] for r in family["records"]})
        assert header[1:-1] == [f"{n} tasks: {what} (%)" for n in ns for what in ("joint", "per-task")]
        methods = list(dict.fromkeys(r["method"] for r in family["records"]))
        assert len(rows) == len(methods)
        for row, method in zip(rows, methods):
            for i, n in enumerate(ns):
                (record,) = [r for r in family["records"] if r["method"] == method and r["n_models"] == n]
                assert row[1 + 2 * i] == f"{100 * record['joint']:.1f}", (family["label"], method, n)
                assert row[2 + 2 * i] == f"{100 * record['task_mean']:.1f}", (family["label"], method, n)


def test_disjoint_tasks_findings_name_the_best_merges_of_the_committed_results():
    results = json.loads((ROOT / "benchmarks" / "results" / "disjoint_tasks.json").read_text())
    text = (DOCS / "_generated" / "benchmarks" / "disjoint_tasks_findings.inc").read_text()
    checked = 0
    for family in results["families"].values():
        for n in sorted({r["n_models"] for r in family["records"]}):
            records = [r for r in family["records"] if r["n_models"] == n]
            merges = [r for r in records if r["method"] not in ("base", "ensemble")]
            best = max(r["joint"] for r in merges)
            ensemble = next(r["joint"] for r in records if r["method"] == "ensemble")
            (line,) = [x for x in text.splitlines() if x.startswith(f"* {family['label']}, {n} tasks:")]
            joint = re.search(r"best joint accuracy .* (\d+\.\d) % \((above|below) the ensemble's (\d+\.\d) %", line)
            assert joint.group(1) == f"{100 * best:.1f}" and joint.group(3) == f"{100 * ensemble:.1f}"
            assert joint.group(2) == ("above" if best > ensemble else "below")
            checked += 1
    assert checked == 4


def test_methods_tables_are_the_committed_results():
    """Every cell of the every-method tables is the mean of the committed records it names."""
    results = json.loads((ROOT / "benchmarks" / "results" / "methods.json").read_text())
    text = (DOCS / "_generated" / "benchmarks" / "methods_tables.inc").read_text()
    tables = [t for t in text.split(".. list-table::") if t.strip() and "choices of the reference" not in t]
    assert len(tables) == len(results["families"])
    checked = 0
    for table, family in zip(tables, results["families"].values()):
        title, (header, *rows) = parse_list_table(".. list-table::" + table)
        assert title.startswith(family["label"])
        ns = sorted({r["n_models"] for r in family["records"]})
        assert rows[0][1] == f"{100 * np.mean(family['base']):.1f}"
        for row in rows[1:]:
            (key,) = [k for k in dict.fromkeys(r["method"] for r in family["records"])
                      if _methods_label(k) == row[0]]
            for cell, n in zip(row[1:], ns):
                mine = [r for r in family["records"]
                        if r["method"] == key and r["n_models"] == n and r["reference"] == 0]
                if cell.startswith("n/a"):
                    assert any("error" in r for r in mine)
                    continue
                mean = 100 * np.mean([r["accuracy"] for r in mine])
                assert abs(float(cell.split(" ±")[0]) - mean) <= 0.05 + 1e-9, (row, n)  # printed to 0.1
                checked += 1
    assert checked > 0


def test_methods_findings_are_generated_from_the_committed_results():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import methods

    results = json.loads((ROOT / "benchmarks" / "results" / "methods.json").read_text())
    text = (DOCS / "_generated" / "benchmarks" / "methods_findings.inc").read_text()
    assert text == methods.findings(results)
    best = {}
    for family in results["families"].values():  # the first line per family names the best merge
        records = [r for r in family["records"] if r["reference"] == 0 and r["n_models"] == 2]
        by_method = {}
        for r in records:
            by_method.setdefault(r["method"], []).append(r.get("accuracy"))
        means = {k: np.mean(v) for k, v in by_method.items() if None not in v}
        best[family["label"]] = f"{100 * max(means.values()):.1f}"
    for label, value in best.items():
        (line,) = [x for x in text.splitlines() if x.startswith(f"* {label}, 2 models")]
        assert re.search(r"best [^;]*? (\d+\.\d),", line).group(1) == value, line


def test_optimal_transport_reg_table_is_the_committed_results():
    """The reg study's table is written from its results: the reg chosen per set is the best on
    the held-out images, and the chosen column is the mean of the test accuracies at those regs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import converged_ot_reg

    results = json.loads((ROOT / "benchmarks" / "results" / "converged_ot_reg.json").read_text())
    text = (DOCS / "_generated" / "benchmarks" / "converged_ot_reg.inc").read_text()
    assert text == converged_ot_reg.table(results)
    _, (header, *rows) = parse_list_table(text[text.index(".. list-table::"):])
    column = header.index("test at the chosen reg")
    checked = 0
    for family in results["families"].values():
        for size in sorted({len(k.split("+")) for k in family["sets"]}):
            entries = [e for k, e in family["sets"].items() if len(k.split("+")) == size]
            for e in entries:
                assert e["validation"][str(e["chosen_reg"])] == max(e["validation"].values())
            (row,) = [r for r in rows if r[0] == family["label"] and r[1].startswith(f"{size} (")]
            mean = 100 * np.mean([e["test"][str(e["chosen_reg"])] for e in entries])
            assert abs(float(row[column].split(" ±")[0]) - mean) <= 0.05 + 1e-9
            checked += 1
    assert checked > 0


def _methods_label(key: str) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import methods

    return dict(methods.METHODS)[key]


def test_benchmarks_page_opens_with_the_headline():
    text = (DOCS / "benchmarks.rst").read_text()
    table = text.index(".. include:: _generated/benchmarks/accuracy_headline.inc")
    figure = text.index(".. figure:: _generated/benchmarks/accuracy_vs_models.png")
    assert table < figure < text.index("Protocol\n~~~~~~~~")
    for include in re.findall(r"\.\. (?:include|figure|image):: (\S+)", text):
        assert (DOCS / include).is_file(), include


def test_front_page_quick_start_is_the_readme():
    """The two quick-start commands of docs/index.rst are the README's, character for character."""
    readme = (ROOT / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start"):readme.index("The demo prints")]
    commands = re.findall(r"```bash\n(.*?)\n```", quick_start)
    assert len(commands) == 2
    index = (DOCS / "index.rst").read_text()
    assert re.findall(r"   \$ (.*)", index) == commands
    for figure in re.findall(r"\.\. figure:: (\S+)", index):
        assert (DOCS / figure).is_file(), figure


def _gallery_order():
    namespace = {}
    exec((DOCS / "_gallery_order.py").read_text(), namespace)
    return namespace


def test_gallery_examples_are_listed_titled_and_single_threaded():
    """What sphinx-gallery needs of each example, and what keeps the docs build fast."""
    order = _gallery_order()
    files = sorted(path.name for path in GALLERY.glob("*.py"))
    assert sorted(order["ORDER"]) == files
    assert files, "no gallery examples"
    for name in files:
        source = (GALLERY / name).read_text()
        docstring = ast.get_docstring(ast.parse(source), clean=False)
        assert docstring is not None, name
        title, underline = docstring.strip().splitlines()[:2]
        assert underline == "=" * len(title), name
        assert "torch.set_num_threads(1)" in source, name
        assert max(len(line) for line in source.splitlines()) <= 79, name
    assert (GALLERY / "GALLERY_HEADER.rst").is_file()


def test_gallery_order_sorts_by_the_list_and_rejects_an_unlisted_example():
    namespace = _gallery_order()
    key = namespace["GalleryOrder"](str(GALLERY))
    listed = namespace["ORDER"]
    assert sorted(listed, key=lambda name: key(str(GALLERY / name))) == listed
    assert [namespace["gallery_position"](name) for name in listed] == list(range(len(listed)))
    with pytest.raises(ValueError, match="not listed"):
        key(str(GALLERY / "plot_unknown.py"))


def test_converged_findings_are_generated_from_the_committed_results():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import converged

    results = json.loads((ROOT / "benchmarks" / "results" / "converged.json").read_text())
    text = (DOCS / "_generated" / "benchmarks" / "converged_findings.inc").read_text()
    assert text == converged.findings(results)
    assert "ridge CCA with its best gamma" in text


def test_converged_placements_are_generated_from_the_committed_results():
    """The placements table and its sentences are today's rendering of the committed records, with a
    column per placement and the channels never active of every family."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import converged

    results = json.loads((ROOT / "benchmarks" / "results" / "converged.json").read_text())
    text = (DOCS / "_generated" / "benchmarks" / "converged_placements.inc").read_text()
    assert text == converged.placement_table(results)
    assert all(f"``{t}``" in text for t in converged.TAPS)
    assert all(len(fam.get("dead_channels", [])) == len(fam["seeds"]) for fam in results["families"].values())


def test_converged_tables_are_the_committed_results():
    """The converged-models table: every cell is the mean of the committed per-set records."""
    results = json.loads((ROOT / "benchmarks" / "results" / "converged.json").read_text())
    text = (DOCS / "_generated" / "benchmarks" / "converged_tables.inc").read_text()
    _, (header, *rows) = parse_list_table(text)
    assert header[:7] == ["models", "merged", "base (mean)", "averaging", "taps", "permutation", "CCA (r=0.3)"]
    checked = reference_rows = 0
    for row in rows:
        family = next(f for f in results["families"].values() if f["label"] == row[0])
        size, taps = int(row[1].split()[0]), row[4].strip("`")
        entries = [e for key, e in family["sets"].items() if len(key.split("+")) == size and taps in e]
        assert int(row[1].split("(")[1].split()[0]) == len(entries) > 0  # "2 (6 sets)": the sets averaged
        for column, key in ((5, "permutation"), (6, "cca_default"), (7, "cca_tuned")):
            values = [100 * e[taps][key] for e in entries]
            mean = f"{np.mean(values):.1f}"
            assert row[column].split(" ±")[0] == mean, (row[0], size, taps, key)
            checked += 1
        ridge = header.index("ridge CCA (best gamma)")
        if taps != "formed" or not all("reference" in e for e in entries):
            assert row[ridge] == "-"
            continue
        mean = f"{np.mean([100 * e['reference']['ridge_cca'] for e in entries]):.1f}"
        assert row[ridge].split(" ±")[0] == mean, (row[0], size, "ridge CCA")
        assert row[ridge + 1] == ", ".join(f"{g:g}" for g in sorted(
            {e["reference"]["ridge_cca_gamma"] for e in entries}))
        reference_rows += 1
    assert checked == 3 * len(rows) > 0
    assert reference_rows > 0  # the reference's ridge CCA is in the committed results


def test_converged_repair_table_is_the_committed_results():
    """The REPAIR table: each cell the mean of the committed per-set records, only families without BatchNorm."""
    results = json.loads((ROOT / "benchmarks" / "results" / "converged.json").read_text())
    text = (DOCS / "_generated" / "benchmarks" / "converged_repair.inc").read_text()
    _, (header, *rows) = parse_list_table(text)
    assert header[3:7] == ["permutation", "permutation + REPAIR", "CCA (r=0.3)", "CCA (r=0.3) + REPAIR"]
    for row in rows:
        family = next(f for f in results["families"].values() if f["label"] == row[0])
        assert "BN" not in row[0] or "no BN" in row[0]  # REPAIR is measured without BatchNorm only
        size = int(row[1].split()[0])
        entries = [e for key, e in family["sets"].items()
                   if len(key.split("+")) == size and "repair" in e and "formed" in e]
        assert int(row[1].split("(")[1].split()[0]) == len(entries) > 0
        columns = [[e["formed"]["permutation"] for e in entries], [e["repair"]["permutation"] for e in entries],
                   [e["formed"]["cca_default"] for e in entries], [e["repair"]["cca_default"] for e in entries]]
        for column, values in zip(row[3:7], columns):
            assert column.split(" ±")[0] == f"{100 * np.mean(values):.1f}", (row[0], size)
        base = np.mean([e["base_mean"] for e in entries])
        assert row[7] == f"{100 * max(np.mean(v) for v in columns) / base:.0f}"
    assert len(rows) >= 3


def test_resnet_candidates_page_is_generated_from_the_committed_results():
    """Every cell of the ResNet candidates table is a committed record; the findings are recomputed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import resnet_candidates

    results = json.loads((ROOT / "benchmarks" / "results" / "resnet_candidates.json").read_text())
    text = (DOCS / "_generated" / "benchmarks" / "resnet_candidates.inc").read_text()
    assert resnet_candidates.table(results) in text
    assert resnet_candidates.findings(results) in text
    _, (header, *rows) = parse_list_table(resnet_candidates.table(results))
    assert len(rows) == sum(len(f["pairs"]) for f in results["families"].values()) > 0
    for row in rows:
        family = next(f for f in results["families"].values() if f["label"] == row[0])
        entry = family["pairs"][row[1].replace(" + ", "+")]
        for key, label in resnet_candidates.COLUMNS:
            assert row[header.index(label)] == f"{100 * entry[key]:.1f}"
        # folding the BatchNorms into the convolutions keeps the base models' functions
        assert np.mean(entry["folded_models"]) == pytest.approx(entry["base_mean"], abs=5e-4)
    # what the benchmarks page says of the candidates
    pairs = [e for f in results["families"].values() for e in f["pairs"].values()]
    helps = [k for k in resnet_candidates.CANDIDATES if all(e[k] > e["cca"] for e in pairs)]
    assert helps == ["cca_pre_and_post_relu"]
    assert all(e["cca_streams_perm_hidden"] < e["cca"] and e["perm_streams_cca_hidden"] < e["cca"] for e in pairs)
