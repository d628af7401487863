"""Analyses and reports from stored results: the papers' tables and figures, the per-example
analysis, the mechanism analyses (layer error, early exit, activation patching) and Figure 3's alpha
sweep.
"""
