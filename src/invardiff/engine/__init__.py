from .engine import CacheEngine, EngineError
from .policy import CachePolicy, PlanConfig, register_policy
from .summary import BranchSummary, EngineSummary
