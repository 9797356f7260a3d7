"""Layer 2, ``deploy``: a calibrated model as bytes, on disk and at run time.

Imports ``core`` and ``codec`` only, so a user who only deploys (loads an artifact or a checkpoint, runs
compressed, exports ONNX) imports no calibration code. ``layer_bytes`` (a quantizer's tensor to a blob and back),
``compressed`` + ``liveness`` (the compressed runtime and its memory plan), ``banded`` + ``arena`` (the row-banded
runtime and its arena), ``artifact`` (the JSON artifact),
``checkpoint`` (quantized checkpoints), ``accounting`` + ``meter`` (stored bits, the logged memory figures) and
``onnx`` (QDQ export and its layer-by-layer verification). The public names are re-exported by
:mod:`lightning_dqa`.
"""
