"""Human-readable results: the table printed at the end of every run."""

from __future__ import annotations


def results_table(rows: dict[str, dict], metric: str, num_layers: int) -> str:
    """One line per policy: task metric (and accuracy when the metric is another), mean exit layer, speedup,
    saved layers, exit histogram."""
    extra = metric != "accuracy"
    head = f"{'policy':<28}{metric:>9}" + (f"{'acc':>8}" if extra else "")
    head += f"{'exit':>7}{'speedup':>9}{'saved':>8}  histogram (layers 1..{num_layers})"
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        line = f"{name:<28}{100 * m['score']:>9.2f}" + (f"{100 * m['accuracy']:>8.2f}" if extra else "")
        line += (f"{m['avg_exit_layer']:>7.2f}{m['speedup']:>8.2f}x{100 * m['saved_layers']:>7.1f}%  "
                 f"{m['exit_histogram']}")
        lines.append(line)
    return "\n".join(lines)
