"""Layer 4, ``integration``: the only modules that import Lightning.

``callback`` (:class:`~.callback.DQACallback`: the lifecycle hooks), ``data`` (where calibration batches come
from, how a batch splits into input and target), ``distributed`` (the strategy's reduce and broadcast),
``progress`` (Lightning's progress bars for long passes), ``checkpoint_hooks`` (``MyModule.load_from_checkpoint``
of a quantized checkpoint), ``finite`` (non-finite activations named by layer) and ``cli`` (``lightning-dqa``).
"""
