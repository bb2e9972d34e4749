"""Scale-out: many generations on a Ray actor pool, sharded calibration, and consistent cache decisions when one
generation is split over ranks (context parallelism). Ray is an optional extra (``pip install invardiff[ray]``);
importing this package does not import it."""

from .items import Manifest, WorkItem, work_items
from .runner import ItemRunner, PipelineSource, run_local


__all__ = ["ItemRunner", "Manifest", "PipelineSource", "WorkItem", "run_local", "work_items"]
