"""Lineage analysis: polars frames a notebook can query, plus the tables, plots and reports of avo.analyze.

    from avo.analysis import load, tables
    lin = load(["outputs/sweep"])
    tables.runs_summary(lin)                                # one row per run
    tables.commits(lin).filter(pl.col("gain") > 0.05).collect()
"""
from avo.analysis import tables as tables
from avo.analysis.reader import AnalysisError as AnalysisError
from avo.analysis.reader import Lineage as Lineage
from avo.analysis.reader import load as load
from avo.analysis.tables import attempts as attempts
from avo.analysis.tables import best_configs as best_configs
from avo.analysis.tables import commits as commits
from avo.analysis.tables import configs as configs
from avo.analysis.tables import runs_summary as runs_summary
from avo.analysis.tables import sweep_summary as sweep_summary
