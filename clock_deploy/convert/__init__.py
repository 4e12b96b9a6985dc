"""Converters from public DETR checkpoints (transformers folders, original `.pth` files) to the
project's models: one module per architecture, `importer` reads the files and writes checkpoints."""
