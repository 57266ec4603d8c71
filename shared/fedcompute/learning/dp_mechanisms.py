"""Stage 2 of a server round: pick the DP mechanism a task's parameters name.

:func:`build_dp_aggregator` is the one place that maps a :class:`~fedcompute.dp.DpMechanism`
(or None: no DP) to its implementation in :mod:`.dp_gaussian` or :mod:`.dp_tree`; building
validates the parameters, so a bad config fails here with a ConfigError naming the field.
"""
from __future__ import annotations

from fedcompute.dp import DpMechanism, DpParams, parse_mechanism
from fedcompute.learning.dp_core import DpAggregator
from fedcompute.learning.dp_gaussian import AdaptiveGaussianAggregator, FixedGaussianAggregator, NoDpAggregator
from fedcompute.learning.dp_tree import AdaptiveTreeAggregator, TreeAggregationAggregator


def build_dp_aggregator(params: DpParams) -> DpAggregator:
    """The mechanism for ``params.mechanism`` (validates the parameters)."""
    match parse_mechanism(params.mechanism):  # raises ConfigError for an unknown name
        case None:
            return NoDpAggregator(params)
        case DpMechanism.FIXED_GAUSSIAN:
            return FixedGaussianAggregator(params)
        case DpMechanism.ADAPTIVE_GAUSSIAN:
            return AdaptiveGaussianAggregator(params)
        case DpMechanism.TREE_AGGREGATION:
            return TreeAggregationAggregator(params)
        case DpMechanism.ADAPTIVE_TREE:
            return AdaptiveTreeAggregator(params)
