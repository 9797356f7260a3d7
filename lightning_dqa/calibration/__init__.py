"""Layer 3, ``calibration``: from data to frozen quantizers, without Lightning.

Imports ``core``, ``codec`` and ``deploy``. The staged ``engine`` (:func:`~.engine.calibrate`) runs ``collect``
(observers and ``sampling``) -> ``clipping`` -> ``selection`` (rankings; ``greedy`` with its ``fxreplay`` and
``replicas``) -> ``methods`` (each method's own step, e.g. ``noisyquant_search``); ``allocation`` + ``budget``
choose widths under ``target_bits`` / ``target_peak_bytes``; ``scales`` and ``report`` serve them all.
"""
