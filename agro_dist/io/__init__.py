"""What goes in and out of a run, shared by the driver, the generators and the learner: model
names and folders resolved (``models``: the default SmolLM2 converted once, hub ids, local
folders), weights as they travel through Ray's object store (``weights``: numpy views, never
pickled tensors; LoRA adapters), storage for run folders and checkpoints on a disk or a bucket
(``storage``), and the model card written into every Hugging Face folder (``model_card``)."""
