"""The learner (installed as ``agro_dist.learner``): a DeepSpeed engine applying AGRO losses to
groups from the replay buffer, publishing weights and writing checkpoints."""
