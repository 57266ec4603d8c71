"""One DP vocabulary from config to checkpoint to ledger: :class:`DpMechanism`, :class:`DpParams`
and :class:`TaskDp` (a task record's typed ``dp``: the parameters plus the ledger's ε target,
δ and population size).

Light (standard library only): config validation, the task builder, the server phase, the
aggregator, the checkpoint's DP state and the privacy ledger all speak these types.
"No DP" is no mechanism (``None``) in code and :data:`NO_DP_NAME` on the wire; the seed's
``TREE`` alias and an empty string are accepted on input by :func:`parse_mechanism` only.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from numbers import Integral
from typing import Any

from fedcompute.errors import ConfigError
from fedcompute.privacy.disclosure import redact_dp

_F_TYPE = "differential_privacy.type"


NO_DP_NAME = "NONE"
"""How "no DP" is written on the wire (config, server phase, checkpoint, metrics config)."""


class DpMechanism(str, enum.Enum):
    """The DP aggregators of ODP's ``DpAggregator`` enum. "No DP" is no mechanism (None)."""

    FIXED_GAUSSIAN = "FIXED_GAUSSIAN"
    TREE_AGGREGATION = "TREE_AGGREGATION"
    ADAPTIVE_GAUSSIAN = "ADAPTIVE_GAUSSIAN"
    ADAPTIVE_TREE = "ADAPTIVE_TREE"

    @property
    def is_tree(self) -> bool:
        """True for the DP-FTRL (tree aggregation) mechanisms."""
        return self in (DpMechanism.TREE_AGGREGATION, DpMechanism.ADAPTIVE_TREE)

    @property
    def is_adaptive(self) -> bool:
        """True for the mechanisms that adapt the clip to a quantile of update norms."""
        return self in (DpMechanism.ADAPTIVE_GAUSSIAN, DpMechanism.ADAPTIVE_TREE)

    @property
    def proto_number(self) -> int:
        """The number of this mechanism in ODP's ``DpAggregator`` proto enum."""
        return _PROTO_NUMBERS[self]

    @classmethod
    def coerce(cls, value: DpMechanism | str | int) -> DpMechanism:
        """A member from a member, its name (any case; the seed's ``TREE`` alias) or its proto
        number. Raises ConfigError naming the choices otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Integral) and not isinstance(value, bool):
            for member, number in _PROTO_NUMBERS.items():
                if number == int(value):
                    return member
        elif isinstance(value, str):
            name = value.strip().upper()
            if name == "TREE":  # the seed's spelling of ODP's TREE_AGGREGATION
                return cls.TREE_AGGREGATION
            if name in cls.__members__:
                return cls[name]
        choices = ", ".join(m.value for m in cls)
        raise ConfigError(
            f"unknown DP aggregator {value!r}; choose one of {choices} (TREE is accepted for "
            "TREE_AGGREGATION)",
            location=_F_TYPE,
        )


_PROTO_NUMBERS = {
    DpMechanism.FIXED_GAUSSIAN: 1,
    DpMechanism.TREE_AGGREGATION: 2,
    DpMechanism.ADAPTIVE_GAUSSIAN: 3,
    DpMechanism.ADAPTIVE_TREE: 4,
}


def parse_mechanism(value: DpMechanism | str | int | None) -> DpMechanism | None:
    """A mechanism, or None for no DP (None, an empty string or ``NONE`` in any case)."""
    if value is None or (isinstance(value, str) and value.strip().upper() in ("", NO_DP_NAME)):
        return None
    return DpMechanism.coerce(value)


def mechanism_name(mechanism: DpMechanism | None) -> str:
    """The wire spelling of ``mechanism`` (``NONE`` for no DP)."""
    return NO_DP_NAME if mechanism is None else mechanism.value


def _optional_clip(value: float | None) -> float | None:
    """The server phase writes an unset clip as 0.0; in memory it is None."""
    return None if value is None or value == 0.0 else float(value)


@dataclass(frozen=True)
class DpParams:
    """A task's DP aggregation parameters (validated when a mechanism is built from them).

    ``clip_norm`` bounds each client's whole update in L2 (None: no clipping, only for
    ``NONE``); ``noise_multiplier`` z gives noise stddev z * clip_norm on the sum. The
    adaptive mechanisms start from ``init_clip_norm`` (None: ``clip_norm``) and move the clip
    toward ``target_unclipped_quantile`` at a geometric ``clip_learning_rate``;
    ``clipped_count_stddev`` None means 0.05 * report goal (TFF). The tree mechanisms restart
    their noise tree every ``restart_period`` releases, the first time after
    ``restart_warmup`` (None: the mechanism's default). ``noise_seed`` fixes the noise for
    tests and reproducible runs only.

    On the wire (the server phase's ``dp`` block) the mechanism is ``type`` and an unset
    clip is 0.0: see :meth:`to_dict` / :meth:`from_dict`.
    """

    mechanism: DpMechanism | None = None
    noise_multiplier: float = 0.0
    clip_norm: float | None = None
    init_clip_norm: float | None = None
    target_unclipped_quantile: float = 0.5
    clip_learning_rate: float = 0.2  # geometric: the clip moves by at most exp(rate) a round
    clipped_count_stddev: float | None = None
    restart_period: int | None = None
    restart_warmup: int | None = None
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        # Accept the wire spelling (a name, the TREE alias, NO_DP_NAME). An unknown name is kept as
        # given and refused (ConfigError naming the choices) when a mechanism is built from it.
        try:
            object.__setattr__(self, "mechanism", parse_mechanism(self.mechanism))
        except ConfigError:
            pass

    @property
    def is_private(self) -> bool:
        """True when a mechanism clips, may add noise and spends privacy budget."""
        return self.mechanism is not None

    @property
    def mechanism_name(self) -> str:
        return mechanism_name(self.mechanism)

    def to_dict(self) -> dict[str, Any]:
        """The server phase's ``dp`` block (wire format: ``type``, unset clips as 0.0)."""
        out: dict[str, Any] = {
            "type": mechanism_name(self.mechanism),
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm or 0.0,
            "init_clip_norm": self.init_clip_norm or 0.0,
            "target_unclipped_quantile": self.target_unclipped_quantile,
            "clip_learning_rate": self.clip_learning_rate,
            "clipped_count_stddev": self.clipped_count_stddev,
            "noise_seed": self.noise_seed,
        }
        if self.restart_period is not None:
            out["restart_period"] = self.restart_period
        if self.restart_warmup is not None:
            out["restart_warmup"] = self.restart_warmup
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DpParams:
        """Inverse of :meth:`to_dict` (unknown keys are ignored, as older readers did)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"mechanism", "clip_norm", "init_clip_norm"}
        return cls(mechanism=parse_mechanism(data.get("type")), clip_norm=_optional_clip(data.get("clip_norm")),
                   init_clip_norm=_optional_clip(data.get("init_clip_norm")),
                   **{k: v for k, v in data.items() if k in known})


NO_DP = DpParams()
"""The parameters of a task without DP."""


@dataclass(frozen=True)
class TaskDp:
    """A task's DP as its record keeps it (the privacy ledger's inputs): the server phase's
    :class:`DpParams` without the noise seed, plus the accounting's ε target, δ and the
    population size. Stored as one Firestore map: the ``dp`` block's fields (``type``, ...)
    and ``target_epsilon``, ``delta``, ``population_size`` side by side."""

    params: DpParams = NO_DP
    target_epsilon: float = 0.0
    delta: float = 0.0
    population_size: int = 0

    def __post_init__(self) -> None:
        # The record reaches the dashboard and task management: it never keeps a noise seed.
        if self.params.noise_seed is not None:
            object.__setattr__(self, "params", dataclasses.replace(self.params, noise_seed=None))

    def to_dict(self) -> dict[str, Any]:
        """The stored map (no ``noise_seed`` key)."""
        out = redact_dp(self.params.to_dict())
        out.update(target_epsilon=self.target_epsilon, delta=self.delta, population_size=self.population_size)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskDp:
        """Inverse of :meth:`to_dict`; reads every map stored since records kept ``dp``."""
        return cls(params=DpParams.from_dict(data), target_epsilon=float(data.get("target_epsilon", 0.0) or 0.0),
                   delta=float(data.get("delta", 0.0) or 0.0),
                   population_size=int(data.get("population_size", 0) or 0))
