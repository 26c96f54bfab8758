"""Ablation studies: planning, executing, the results store, statistics, the report and its
figures, the embedded demo study.

Nothing is imported here, so that ``import trainwell`` stays light; import the modules.
"""
