"""The cache engine: run state, hooks and the runtime policy interface. It imports no policy."""

from .engine import CacheEngine, EngineError
from .policy import CachePolicy, ProbeDecision, StepAction, register_policy
from .summary import BranchSummary, EngineSummary
