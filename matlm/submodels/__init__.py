"""Submodels as deliverables: extract (matlm.submodels.extract), search, export."""
