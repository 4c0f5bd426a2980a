"""Models of pacsnode: Keras definitions, manifests, registry and synthetic phantoms."""
