"""The cross-experiment tables of docs/RESULTS.md, from the reports `scripts/reproduce_cpu.sh` writes.

    python scripts/results_tables.py [OUTPUTS]        (default outputs/cpu; markdown on stdout)

Each experiment's report.md has its own tables; the claims compare experiments (strong, weak and no
weight decay), so these tables put them side by side. Every figure is mean ± standard deviation over
the pairs (or models) with n beside it, as lmcx.report writes them (`report.fmt`); a single value has
no ±. Test split throughout.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmcx.report import fmt, md_table  # noqa: E402

MLPS = [("3e-3 (strong)", "mlp_mnist_strong_wd"), ("1e-4 (weak)", "mlp_mnist_weak_wd"),
        ("0 (none)", "mlp_mnist_no_wd")]
RESNET = "resnet20_cifar10"


def rows(root: Path, name: str, file: str = "summary.csv") -> list[dict[str, str]]:
    path = root / name / file
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("split", "test") == "test"]


def values(table: list[dict[str, str]], column: str, **match) -> list[float | None]:
    out = []
    for r in table:
        if all(r.get(k) == v for k, v in match.items()):
            out.append(float(r[column]) if r.get(column) not in (None, "") else None)
    return out


def widths(table: list[dict[str, str]]) -> list[str]:
    return sorted({r["width"] for r in table}, key=float)


def endpoint_accuracy(table: list[dict[str, str]], width: str) -> list[float | None]:
    """Test accuracy per model (each seed once, though it is in several pairs)."""
    acc: dict[str, float] = {}
    for r in table:
        if r["width"] == width and r["method"] == "naive":
            acc[r["seed_a"]], acc[r["seed_b"]] = float(r["acc_a_pct"]), float(r["acc_b_pct"])
    return list(acc.values())


def md(header: list[str], body: list[list[str]]) -> str:
    """A Markdown table, as report.md's."""
    return "\n".join(md_table(header, body))


def per_width(root: Path, title: str, columns: list[tuple[str, str, str, int]]) -> str:
    """A row per (experiment, width); the columns (label, method, summary column, digits)."""
    body = []
    for label, name in MLPS:
        table = rows(root, name)
        for w in widths(table):
            body.append([label, f"{float(w):g}×"] + [fmt(values(table, column, width=w, method=method), digits)
                                                      for _, method, column, digits in columns])
    return f"### {title}\n\n" + md(["weight decay", "width"] + [c[0] for c in columns], body)


def accuracy_table(root: Path) -> str:
    tables = {name: rows(root, name) for _, name in MLPS}
    present = [(label, name) for label, name in MLPS if tables[name]]
    all_widths = sorted({w for t in tables.values() for w in widths(t)}, key=float)
    body = [[f"{float(w):g}×"] + [fmt(endpoint_accuracy(tables[name], w), 2, " %") for _, name in present]
            for w in all_widths]
    return "### Endpoint test accuracy (over models; columns: weight decay)\n\n" + md(["width"] + [label for label, _ in present], body)


def three_models_table(root: Path) -> str:
    table = rows(root, "mlp_mnist_strong_wd", "three_models.csv")  # the one experiment with three_models
    if not table:
        return ""
    methods = list(dict.fromkeys(r["method"] for r in table))
    body = []
    for w in widths(table):
        body.append([f"{float(w):g}×"] + [" / ".join(fmt(values(table, c, width=w, method=m), d)
                                                    for c, d in (("loss_barrier", 4), ("calibrated_loss_barrier", 4),
                                                                 ("acc_barrier_pp", 2)))
                                          for m in methods])
    return ("### Three models through one anchor (models 1 and 2 each matched to anchor 0, then interpolated "
            "with each other; loss / calibrated / acc pp)\n\n"
            + md(["width"] + methods, body))


def resnet_table(root: Path) -> str:
    table = rows(root, RESNET)
    if not table:
        return ""
    body = []
    for w in widths(table):
        for m in dict.fromkeys(r["method"] for r in table):
            body.append([f"{float(w):g}×", m] + [fmt(values(table, c, width=w, method=m), d) for c, d in
                                               (("loss_barrier", 3), ("calibrated_loss_barrier", 3),
                                                ("acc_barrier_pp", 2), ("alignment_R_gamma0.3", 3),
                                                ("l2_relative_reduction_pct", 1))])
    acc = {w: fmt(endpoint_accuracy(table, w), 2, " %") for w in widths(table)}
    return ("### ResNet-20 on CIFAR-10 (BN reset)\n\n"
            + md(["width", "method", "loss barrier", "calibrated", "acc barrier (pp)", "R(0.3)", "L2 reduction %"], body)
            + "\n\nEndpoint test accuracy on the curves (λ = 0 and 1, BN statistics reset like every λ; "
            "report.md gives the models' own): " + ", ".join(f"{float(w):g}×: {a}" for w, a in acc.items()))


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/cpu")
    parts = [
        "<!-- written by scripts/results_tables.py from " + str(root) + "; do not edit by hand -->",
        accuracy_table(root),
        per_width(root, "Claim 1: naive (unpermuted) barrier — raw, calibrated, accuracy (pp)",
                  [("raw", "naive", "loss_barrier", 3), ("calibrated", "naive", "calibrated_loss_barrier", 3),
                   ("acc", "naive", "acc_barrier_pp", 1)]),
        per_width(root, "Claim 2: weight matching's barrier — raw, calibrated, accuracy (pp)",
                  [("raw", "wm", "loss_barrier", 4), ("calibrated", "wm", "calibrated_loss_barrier", 4),
                   ("acc", "wm", "acc_barrier_pp", 2)]),
        per_width(root, "Claim 3: singular-vector alignment R(γ = 0.3) and WM's L2 reduction",
                  [("R naive", "naive", "alignment_R_gamma0.3", 3), ("R WM", "wm", "alignment_R_gamma0.3", 3),
                   ("L2 reduction %", "wm", "l2_relative_reduction_pct", 1)]),
        per_width(root, "Claim 4: LEWC against LLFC at λ = ¼ (relative error of the layer outputs, mean over layers)",
                  [("naive LEWC", "naive", "lewc_rel_err_lambda0.25", 3), ("naive LLFC", "naive", "llfc_rel_err_lambda0.25", 3),
                   ("WM LEWC", "wm", "lewc_rel_err_lambda0.25", 3), ("WM LLFC", "wm", "llfc_rel_err_lambda0.25", 3)]),
        three_models_table(root),
        resnet_table(root),
    ]
    print("\n\n".join(p for p in parts if p))


if __name__ == "__main__":
    main()
