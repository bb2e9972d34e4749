"""InvarDiff calibration: measure change rates with full compute, then build a cache plan (SPEC.md A.2-A.3)."""

from ..families.calibration_spec import FamilyCalibration, InvarDiffThresholds
from .budget import calibrate_budget
from .build import final_books, interplay, provisional_books, quantile_threshold, warmup_steps
from .rates import CalibrationRates
from .recorder import CalibrationError, RateRecorder
from .run import calibrate
from .search import BudgetError, SearchConfig, SearchResult, pareto_plans, search_plan
from .thresholds import FAMILY_CALIBRATION, PRESETS, parse_thresholds, preset
from .trajectory import TrajectoryStats, record_trajectories
