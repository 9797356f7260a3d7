"""Layer 0, ``core``: the settings, the tensor maths, the quantizer modules and installing them on a model.

Imports nothing else of the package. ``config`` (:class:`DQAConfig`, validated once), ``widths`` (every width
limit), ``functional`` (quantize, shift, scales: pure tensor functions), ``quantizers`` (the fake-quantizer
module), ``noisyquant`` (the NoisyQuant quantizer), ``attach`` (find the layers, install, ``prepare``) and
``fxgraph`` (torch.fx helpers). The public names are re-exported by :mod:`lightning_dqa`.
"""
