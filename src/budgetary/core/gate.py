"""The confidence gate: stop paying for an agent once it is confident."""

from __future__ import annotations

from dataclasses import dataclass

from budgetary.core.errors import ConfigurationError

__all__ = ["ConfidenceGate"]


@dataclass(frozen=True, slots=True)
class ConfidenceGate:
    """Allow an agent's calls only while its last reported confidence is below ``threshold``.

    With no threshold it always allows; before any confidence was reported it
    allows (fail open: an agent that never reports is not stopped by this gate).

    Example:
        ```python
        gate = ConfidenceGate(0.85)
        gate.allows(None), gate.allows(0.5), gate.allows(0.9)  # True, True, False
        ```
    """

    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None:
            check_fraction(self.threshold, "confidence_threshold")

    def allows(self, confidence: float | None) -> bool:
        """Whether a call may start given the last reported ``confidence``."""
        return self.threshold is None or confidence is None or confidence < self.threshold


def check_fraction(value: object, name: str) -> float:
    """Return ``value`` as a float in [0, 1] or raise `ConfigurationError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number in [0, 1], got {value!r}")
    number = float(value)
    if not 0.0 <= number <= 1.0:  # also rejects NaN
        raise ConfigurationError(f"{name} must be in [0, 1], got {value!r}")
    return number
