"""The launch side: what a run needs on the slice it names, found out before paying for it.

`topology` turns topology strings (`v5e:4x4`, `local`) into devices with their HBM and peak
FLOP/s; `fit_check` compiles a recipe's real train and eval steps for those devices and
reads XLA's memory and cost analyses (`matlm compile`).
"""
