"""The audit: per-class summaries, SpRAy clusters of the heatmaps, flags, and one HTML report.

``audit(out_dir, report_dir, ...) -> AuditResult`` (``pipeline.py``) reads a run's output streaming
(``reader.py``), clusters each class's heatmaps (``spray.py``), flags clusters by the rules in
``flags.py`` and writes ``clusters.parquet``, ``summary.json`` and ``index.html`` (``report.py``).
See the README's "Auditing a model".
"""

from gradcam_batch.engine.audit.flags import FlagParams
from gradcam_batch.engine.audit.pipeline import AuditConfig, AuditResult, ClassAudit, ClusterAudit, audit, run_audit
from gradcam_batch.engine.audit.reader import AuditInputError
from gradcam_batch.engine.audit.spray import SprayParams

__all__ = [
    "AuditConfig",
    "AuditInputError",
    "AuditResult",
    "ClassAudit",
    "ClusterAudit",
    "FlagParams",
    "SprayParams",
    "audit",
    "run_audit",
]
