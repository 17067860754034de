"""Operations on a live model: resolve adapter modules to layers, fuse, unfuse, apply, hotswap."""
