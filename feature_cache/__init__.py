"""The transfer family's engine: MobileNetV2 features computed once per image and view (through LiteRT where it
is faster), kept on disk, and the trainers that train a head, and the top of the base, on them.

``search_spaces`` declares the transfer family's hyperparameters and builds its model; this package makes its
trials take seconds. Nothing here knows the sweep's loop: a family opts in by mixing in ``CachedTraining``.
"""
