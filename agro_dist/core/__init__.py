"""The algorithm core: AGRO's losses and their peers as pure tensor functions chosen by name
(``losses``), and the record contract between generators, buffer and learner (``records``).
No models, no Ray, no files: what is here is checked against exact gradients
(``agro_dist.tabular``, tests/test_estimators_exact.py)."""
