"""ONNX: ``export`` writes a QDQ graph of a calibrated model, ``qdq`` each quantizer's subgraph, ``verify`` a check.

``verify`` checks an exported file against its model layer by layer; all three need
``pip install 'lightning-dqa[onnx]'``.
"""
