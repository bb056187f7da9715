"""``ubpdsl.prune``: block selection (BED, the exact optimum, aligned, unstructured), the
``torch.ao.pruning`` sparsifier, the gradual schedule and trainer, and ``ubpdsl prune``; also
pattern + connectivity pruning, BLK-REW regularisation and activation (pixel) sparsity."""
