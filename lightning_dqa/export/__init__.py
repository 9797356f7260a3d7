"""The deployment artifact: everything a runtime needs to store activations the DQA way, as one JSON file.

Format (``"format": "lightning-dqa/2"``)::

    {
      "format": "lightning-dqa/2",
      "config": {...DQAConfig fields...},
      "layers": [
        {
          "name": "net.layer1.0.conv1",    # qualified module name
          "where": "input",                # the layer's input or output is quantized (the config's)
          "channel_dim": 1,                # channel axis of that tensor
          "channels": 16,
          "bits": 4,                       # n: width of every stored main code (0: left in full precision)
          "extra_bits": 3,                 # m: shifting-error width of important channels
          "signed": false,                 # two's-complement codes, or unsigned (a JSON bool)
          "scale_mode": "static",          # static/learnable: "scales" below; dynamic: null, max|x| at run time
          "scales": [0.031, ...],          # n-bit scale per channel (> 0); important channels use scale / 2**m
          "important": [0, 5, 9, ...],     # distinct channel indices quantized at n+m bits and shifted
          "error_counts": [812, 97, ...],  # calibration histogram of the 2**m shifting errors
          "codebook_lengths": [1, 3, ...], # canonical Huffman code length of each shifting error 0..2**m-1
          "codebook_hex": "...",           # the same code book serialized (HuffmanCodebook.to_bytes)
          # NoisyQuant layers (config method "noisyquant") add:
          "noise": [0.004, ...],           # the per-channel noise N added before quantization
          "clip_ratio": 0.9, "noise_range": 0.5, "noise_shift": -0.25   # what the search chose (a record)
        }, ...
      ]
    }

Each quantizer writes and checks its own fields (:meth:`ActivationQuantizer.artifact_entry
<lightning_dqa.quantizers.ActivationQuantizer.artifact_entry>`), so every method round-trips bit for bit.
The code book is that of ``error_counts``; both code book fields are checked against it. Format
``"lightning-dqa/1"`` files (no ``error_counts``, no noise) are still read, their counts rebuilt as
``2**(max_len - len)``, except for NoisyQuant, whose noise they lost.

A runtime stores, per layer: ``q = round(x / s)`` clamped to ``n`` bits for ordinary channels; for important
channels ``Q = round(x * 2**m / s)`` clamped to ``n + m`` bits, ``q = Q >> m`` and the Huffman-coded
``e = Q & (2**m - 1)``. It reads back ``s * q`` or ``s * (q + e / 2**m)``. NoisyQuant stores the codes of
``x + N`` and folds ``-W N`` into the layer's bias. Scales and noise are written as decimal floats that
round-trip float32 exactly.

:func:`apply_artifact` checks the whole file against the model before touching it (every failure a
``ValueError`` naming the layer, the field, the rule and the value) and leaves the model as it was if
applying still fails.
"""

from lightning_dqa.export.artifact import apply_artifact, export_artifact, load_artifact
from lightning_dqa.export.schema import FORMAT, FORMATS

__all__ = ["FORMAT", "FORMATS", "apply_artifact", "export_artifact", "load_artifact"]
