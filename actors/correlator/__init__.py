"""The correlator: which local block device is which volume, proven and never guessed."""

from actors.correlator.actor import CorrelatorActor
from actors.correlator.engine import SKEW, CorrelationEngine, Decision, InFlightAttach

__all__ = ["SKEW", "CorrelationEngine", "CorrelatorActor", "Decision", "InFlightAttach"]
