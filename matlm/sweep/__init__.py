"""`matlm sweep`: many `matlm train` runs over gin bindings, and their results table.

`spec` reads a sweep file (YAML or gin-style) and expands it into named trials, each
checked against the real configs before anything runs; `runner` runs the trials as
subprocesses (K at a time, each in its own model dir, resumable); `results` gathers the
trials' run configs and metrics into sweep_results.csv / .md and plots.
"""
