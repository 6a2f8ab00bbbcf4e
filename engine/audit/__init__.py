"""The audit: per-class summaries, SpRAy clusters of the heatmaps, flags, and one HTML report.

``audit(out_dir, report_dir, ...) -> AuditResult`` (``pipeline.py``) opens the run's directory
(``run_output.py``: manifest, part files, how far the run got), reads its output streaming
(``reader.py``), clusters each class's heatmaps (``spray.py``), flags clusters by the rules in
``flags.py`` and writes ``clusters.parquet``, ``summary.json`` and ``index.html`` (``report.py``),
all or nothing (``report_files.py``). See the README's "Auditing a model".
"""

from gradcam_batch.engine.audit.flags import FlagParams
from gradcam_batch.engine.audit.pipeline import AuditConfig, AuditResult, ClassAudit, ClusterAudit, audit, run_audit
from gradcam_batch.engine.audit.run_output import AuditError, AuditInputError, AuditOutputError, partial_line
from gradcam_batch.engine.audit.spray import SprayParams

__all__ = [
    "AuditConfig",
    "AuditError",
    "AuditInputError",
    "AuditOutputError",
    "AuditResult",
    "ClassAudit",
    "ClusterAudit",
    "FlagParams",
    "SprayParams",
    "audit",
    "partial_line",
    "run_audit",
]
