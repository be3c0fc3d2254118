"""The Pareto plot: ratios to dense on a log axis, labels that do not overlap, outliers at the edge, peak memory."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from hf_kvplus.eval.plot import _panel, pareto_plot, y_limits  # noqa: E402


def rows(gpu: bool = False) -> list[dict]:
    found = [{"experiment": "compression", "protocol": "compression", "strategy": "dynamic", "ppl": 10.0,
              "cache_mib": 45.0, "status": "ok", "peak_rss_mib": 900.0}]
    for strategy, ppls in (("sink", (10.2, 11.0)), ("h2o", (10.2, 11.0)), ("tova", (10.2, 11.1)),
                           ("window", (25.0, 30.0))):  # three strategies on the same points; window far above
        for keep, ppl in zip((0.5, 0.125), ppls, strict=True):
            found.append({"experiment": "compression", "protocol": "compression", "strategy": strategy, "ppl": ppl,
                          "cache_mib": 45.0 * keep, "keep_ratio": keep, "status": "ok", "peak_rss_mib": 950.0,
                          "device_peak_mib": 1234.0 if gpu else None})
    return found


@pytest.mark.parametrize("values, inside, outside", [
    ([1.0, 1.05, 3.0], [1.0, 1.05, 3.0], []),  # fewer than four: all inside
    ([1.0, 1.05, 1.1, 1.2, 2.0, 2.2], [1.0, 1.2], [2.0, 2.2]),  # two of six above a 1.67x gap
    ([1.0, 1.1, 1.2, 2.0, 2.2], [1.0, 2.2], []),  # two of five: too many to be outliers
    ([1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 2.5], [1.0, 1.3], [2.5]),
    ([1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.4], [1.0, 1.4], []),
])
def test_y_limits_leave_only_far_outliers_outside(values, inside, outside):
    low, high = y_limits(values)
    assert all(low < v < high for v in inside) and all(v > high for v in outside)


def test_labels_do_not_overlap_and_outliers_sit_at_the_edge_with_their_value():
    fig, ax = plt.subplots(figsize=(8, 6))
    _panel(ax, rows(), "compression")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts]
    overlapping = [(a, b) for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1:] if box.overlaps(other)]
    assert len(boxes) == 8 and not overlapping  # 6 keep labels + 2 window values
    assert {"window keep 0.5: 2.5x", "window keep 0.125: 3.0x"} <= {t for t, _ in boxes}
    low, high = ax.get_ylim()
    assert ax.get_yscale() == "log" and high < 2.5 and low < 1.0  # the window does not set the range
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["1x", "1.05x"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "sink (peak RSS 950 MiB)" in legend and "dense (dynamic): ppl 10, peak RSS 900 MiB" in legend
    plt.close(fig)


def test_gpu_runs_show_peak_gpu_memory_and_the_png_is_written(tmp_path):
    fig, ax = plt.subplots()
    _panel(ax, rows(gpu=True), "compression")
    assert "sink (peak GPU 1,234 MiB)" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)
    path = pareto_plot(rows(), tmp_path / "pareto.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pareto_plot([{**r, "status": "error"} for r in rows()], tmp_path / "none.png") is None
