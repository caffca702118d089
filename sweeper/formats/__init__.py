"""Checkpoint formats: the byte layout of torch zip checkpoints (``records``), the inert
unpickler (``unpickler``), what a checkpoint holds (``checkpoint``) and its output
(``output``), and one module per layout family (``layouts``)."""
