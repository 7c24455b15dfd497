"""Memory planning for pipeline-parallel training: per-stage GPU memory, a suggested `parts`
split and the smallest number of GPUs that fits (`python plan.py`, docs/plan.md)."""
