"""Analysis: routing metrics of every family over windows of steps, pruning events, and the report.

Reads run files through routescope.store's `RunFile` (or the Datasets `routescope.open` gives) and
never imports torch. Definitions: docs/metrics.md.

    import routescope
    from routescope import analysis
    ds = routescope.open("run.h5")                     # the tree group, lazily
    analysis.summarize(ds)                              # the last quarter of the run, per layer and tree
    analysis.summarize(ds, window=(300, None), th=analysis.Thresholds(alpha=0.01))
    analysis.timeseries(ds, rolling=5)                  # the same, per interval
    analysis.FAMILY_ANALYSES["moe"].summary(routescope.open("run.h5", group="moe"))
"""

from routescope.analysis.calibrated import DEAD, LIVE, UNDETERMINED, Thresholds, tree_states
from routescope.analysis.events import pruning_events
from routescope.analysis.families import (
    FAMILY_METRICS,
    L1_METRICS,
    MOE_METRICS,
    FamilyLayer,
    family_layers,
    family_timeseries,
    histogram_quantile,
    l1_metrics_numpy,
    moe_metrics_numpy,
    select_family_layers,
    summarize_family,
)
from routescope.analysis.family import FAMILY_ANALYSES, FamilyAnalysis, Metric
from routescope.analysis.mutual_info import mutual_information_table
from routescope.analysis.report import build_report
from routescope.analysis.stats import (
    FROZEN_EPSILON,
    binary_entropy,
    entropy_bits,
    gini,
    is_frozen,
    node_moments,
    right_share,
)
from routescope.analysis.tree import (
    COUNT_VARIABLES,
    SUMMARY_VARIABLES,
    TREE_METRICS,
    LayerInfo,
    depth_metrics_numpy,
    first_step_where,
    layer_infos,
    mutual_information,
    node_drift,
    node_table,
    select_layers,
    summarize,
    timeseries,
    tree_metrics_numpy,
)
from routescope.analysis.warning import WarningReport, early_warnings
from routescope.analysis.window import (
    ALL,
    LAST_QUARTER,
    MetricsError,
    parse_window,
    pick_layers,
    select_window,
    window_counts,
)

__all__ = [
    "ALL", "DEAD", "LAST_QUARTER", "LIVE", "UNDETERMINED", "Thresholds", "tree_states", "mutual_information_table",
    "COUNT_VARIABLES", "FAMILY_ANALYSES", "FAMILY_METRICS", "FROZEN_EPSILON", "L1_METRICS", "MOE_METRICS",
    "SUMMARY_VARIABLES", "TREE_METRICS", "FamilyAnalysis", "FamilyLayer", "LayerInfo", "Metric", "MetricsError",
    "WarningReport", "binary_entropy", "build_report", "depth_metrics_numpy", "early_warnings", "entropy_bits",
    "family_layers", "family_timeseries", "first_step_where", "gini", "histogram_quantile", "is_frozen",
    "l1_metrics_numpy", "layer_infos", "moe_metrics_numpy", "mutual_information", "node_drift", "node_moments",
    "node_table", "parse_window", "pick_layers", "pruning_events", "right_share", "select_family_layers",
    "select_layers", "select_window", "summarize", "summarize_family", "timeseries", "tree_metrics_numpy",
    "window_counts",
]  # fmt: skip
