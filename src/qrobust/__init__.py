"""qrobust: adversarial robustness of quantized neural networks.

Models take pixels in [0, 1] and return logits; every attack works in pixel space.
"""

from qrobust.errors import QrobustError

__version__ = "0.1.0"

__all__ = ["QrobustError", "__version__"]
