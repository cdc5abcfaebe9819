"""Human-readable results: the table printed at the end of every run."""

from __future__ import annotations


def results_table(rows: dict[str, dict], metric: str, num_layers: int) -> str:
    """One line per policy: task metric, accuracy, mean exit layer, speedup, saved layers, exit histogram."""
    head = (f"{'policy':<28}{metric:>9}{'acc':>8}{'exit':>7}{'speedup':>9}{'saved':>8}"
            f"  histogram (layers 1..{num_layers})")
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(
            f"{name:<28}{100 * m['score']:>9.2f}{100 * m['accuracy']:>8.2f}{m['avg_exit_layer']:>7.2f}"
            f"{m['speedup']:>8.2f}x{100 * m['saved_layers']:>7.1f}%  {m['exit_histogram']}"
        )
    return "\n".join(lines)
