"""Lab experiments, one paper (or one measurement) per file; each module's docstring names the paper, the
claim and the command that runs it, and its Experiment objects join ``normlab.lab.experiments.EXPERIMENTS``."""
