"""Training side of lungsys: synthetic phantoms, datasets, training loops and
evaluation. Never imports :mod:`pacs_node`."""
