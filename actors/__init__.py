"""Generator actors (installed as ``agro_dist.actors``): vLLM engines that sample scored groups."""
