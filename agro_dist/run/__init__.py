"""The run that ``python -m agro_dist`` starts: the config (``config``), start-up on Ray
(``startup``), the driver and its loops (``driver``, ``loops``), one class per role it drives
(``learner_group``, ``generator_pool``, ``evaluator``, ``progress``, ``run_folder``), and what a
run writes and moves (``monitor``, ``trackers``, ``storage``, ``weights``, ``model_card``,
``models``). docs/architecture.md draws how they fit."""
