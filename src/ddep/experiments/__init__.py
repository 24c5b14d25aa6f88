"""Runs of runs: the demo, the paper's studies, and the tables and plots they report."""
