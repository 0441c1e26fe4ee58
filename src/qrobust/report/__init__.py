"""Reports of experiment results: tables (markdown/CSV/JSON), figures, sanity checks, an index page."""

from qrobust.report.index import Report, write_report
from qrobust.report.sanity import CHECKS, SanityReport, Violation, check_results
from qrobust.report.tables import Table, detection_table, eps_table, summary_table

__all__ = [
    "CHECKS",
    "Report",
    "SanityReport",
    "Table",
    "Violation",
    "check_results",
    "detection_table",
    "eps_table",
    "summary_table",
    "write_report",
]
