"""The application: the config schema, data, built-in models, building techniques from a
config, one run, ensemble and soup runs, multi-process launch, figures of a run.

Nothing is imported here, so that ``import trainwell`` stays light; import the modules.
"""
