"""Builders shared by the test modules (no test module imports another).

- ``trainers``: a random tiny model on disk, CPU trainer arguments, prompt rows, a trainer with given
  methods, one generation batch, one loss with its gradients;
- ``cov_example``: the shared toy batch of docs/methods.md §1.6 / §2.6 and a ``LossBatch`` built on it;
- ``runs``: synthetic run directories (``metrics.jsonl`` + ``recipe.yaml``) that follow a known law.
"""
