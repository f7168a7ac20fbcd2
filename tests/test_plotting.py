"""training_curves: readable panel titles and y labels from a training log's field names."""

import matplotlib.pyplot as plt

from leank_ref.plotting import CURVE_LABELS, training_curves


def test_training_curves_label_each_panel_with_a_readable_name():
    records = [{"step": i, "distill_loss": 0.1 / (i + 1), "mean_factor": 1 - 0.01 * i, "custom": i} for i in range(5)]
    fig, axes = plt.subplots(1, 3)
    training_curves(axes, records, ("distill_loss", "mean_factor", "custom"), "stage 1: ")
    assert axes[0].get_title() == "stage 1: distillation loss (hidden-state MSE)"
    assert axes[0].get_ylabel() == CURVE_LABELS["distill_loss"]
    assert axes[1].get_ylabel() == "mean factor" and axes[1].get_xlabel() == "step"
    assert axes[2].get_ylabel() == "custom"  # a field without a readable name keeps its own
    assert list(axes[1].lines[0].get_ydata()) == [r["mean_factor"] for r in records]
    plt.close(fig)
