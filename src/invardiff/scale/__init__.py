"""Scale-out: many generations on a Ray actor pool, sharded calibration, and consistent cache decisions when one
generation is split over ranks (context parallelism). Ray is an optional extra (``pip install invardiff[ray]``);
importing this package does not import it."""

from .items import Manifest, SettingsMismatch, WorkItem, work_items
from .runner import ItemRunner, PipelineSource, output_settings, run_local


__all__ = [
    "ItemRunner",
    "Manifest",
    "PipelineSource",
    "SettingsMismatch",
    "WorkItem",
    "output_settings",
    "run_local",
    "work_items",
]
