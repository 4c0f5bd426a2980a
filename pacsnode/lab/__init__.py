"""The lab: synthetic phantoms, training recipes, training and held-out
evaluation of pacsnode's models. A node does not need it to run a model; its
extra dependencies install with ``pip install pacsnode[lab]``. See
docs/architecture.md."""
