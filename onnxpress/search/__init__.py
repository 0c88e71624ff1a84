"""``onnxpress search``: the automatic, measured choice of compression for a model and target.

``space.py`` (which passes apply, their knobs, the pipeline text of a trial),
``sensitivity.py`` (per-layer int8 sensitivities, cached in the search folder),
``objectives.py`` (evaluation data, the user's metric, size), ``latency.py`` (interleaved
onnxruntime ratio against the baseline), ``trial.py`` (one verified, measured pipeline),
``study.py`` (Optuna storage, the replayable sampler, the ask/tell loop), ``engine.py``
(``search(config)``: checks, baseline, space, study, front) and ``front.py`` (search.json,
the Pareto models and recipes, written all at once).

May import: onnxpress.core, calibration, analysis, passes; not backends or train.
Read first: ``engine.py``.
"""
